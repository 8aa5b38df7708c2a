"""The evaluation tasks, by name: each a module with ``BUCKETS`` and ``run(context)``."""

from types import ModuleType

from evaluation.tasks import generation, retrieval, speed, understanding
from evaluation.tasks.base import TaskContext, TaskResult

TASKS: dict[str, ModuleType] = {
    "retrieval": retrieval,
    "understanding": understanding,
    "generation": generation,
    "speed": speed,
}

__all__ = ["TASKS", "TaskContext", "TaskResult"]
