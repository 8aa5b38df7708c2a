"""Library noise kept off the console, each filter scoped to one known message.

``omni`` drivers and every worker of a local Ray instance (its setup hook) install these,
so a stage's console shows its own progress and real errors only. Each entry names the
library line it drops and why it says nothing to an ``omni`` user; anything else a library
logs still shows.
"""

from __future__ import annotations

import logging
import os
import warnings

# Ray Train's placement-group cleaner asks the State API once a second whether the train
# controller is alive; without the dashboard (off locally, see infra.ray_runtime) there is
# no State API, and each failed query logged a warning: 70 of `make demo`'s 122 lines.
TRAIN_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"

# Per logger (exact names: a logger's filters do not apply to its children), the message
# prefixes dropped below ERROR.
DROPPED_MESSAGES: dict[str, tuple[str, ...]] = {
    # Printed by every process that imports DeepSpeed on a machine without a GPU.
    "DeepSpeed": ("Setting accelerator to CPU",),
    # MLflow creating the tables of a new local store (every first run of a workspace).
    "mlflow.store.db.utils": (
        "Creating initial MLflow database tables",
        "Updating database tables",
    ),
    # MLflow's system-metrics sampler (system/* metrics of a training run) starting and
    # stopping on rank 0, and its note that a CPU machine has no GPU to sample.
    "mlflow.system_metrics.system_metrics_monitor": (
        "Started monitoring system metrics",
        "Stopping system metrics monitoring",
        "Successfully terminated system metrics monitoring",
        "Skip logging GPU metrics",
    ),
    # Ray Train's worker-group life cycle, which the progress bar and summary already show.
    "ray.train.v2._internal.execution.scaling_policy.scaling_policy": ("Requesting resources",),
    "ray.train.v2._internal.execution.worker_group.worker_group": (
        "Attempting to start training worker group",
        "Started training worker group",
    ),
    "ray.train.torch.config": ("Setting up process group for",),
}

# (message regex, category): Python warnings of libraries, not of the user's run.
DROPPED_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # DeepSpeed's ZeRO collectives call the torch API its own release deprecated.
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),
)


class _DropKnownMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return not str(record.msg).startswith(self.prefixes)


def quiet_libraries() -> None:
    """Install the filters in this process (idempotent); also Ray workers' setup hook."""
    logging.getLogger(TRAIN_CLEANER_LOGGER).setLevel(logging.ERROR)
    for name, prefixes in DROPPED_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownMessages) for f in logger.filters):
            logger.addFilter(_DropKnownMessages(prefixes))
    for message, category in DROPPED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_local_ray_environment() -> None:
    """Settings of a local Ray instance's processes, set before it starts.

    Ray Train's preemption watcher observes spot-node preemptions, which a single local
    machine never has; its actor's restart settings log an ``E core_worker`` line from C++
    (no Python filter reaches it) on every run.
    """
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
