"""Stand-ins for the driver-side stages that report where they ran (test_driver_tasks)."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any


def where(config: Any, *args: Any) -> dict[str, Any]:
    """The process this ran in, and the Ray resources it held there (none outside Ray)."""
    import ray

    inside = ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    held = ray.get_runtime_context().get_assigned_resources() if inside else {}
    return {"pid": os.getpid(), "resources": held, "args": list(args)}


def sweep(config: Any, run_id: str) -> SimpleNamespace:
    """A sweep report as the eval stage reads it, carrying :func:`where`."""
    return SimpleNamespace(failed=0, notes=[], evaluated=1, where=where(config, run_id))
