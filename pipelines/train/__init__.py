"""The training stage (``omni train``): inputs, the run's lifecycle, Ray Train launch.

``run``, ``TrainReport`` and ``TrainInputError`` load their modules on first use, so
``omni run`` can plan with :mod:`pipelines.train.fingerprints` without importing
DeepSpeed and MLflow (seconds on every ``omni run`` that has nothing to do).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.train.inputs import TrainInputError
    from pipelines.train.stage import TrainReport, run

__all__ = ["TrainInputError", "TrainReport", "run"]
_HOMES = {"run": "stage", "TrainReport": "stage", "TrainInputError": "inputs"}
_SUBMODULES = ("fingerprints", "inputs", "recovery", "resources", "stage", "summary")


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
