"""The ``model`` and ``train`` sections of the config, defined in
:mod:`training.train_config` (light: pydantic only, no torch, DeepSpeed or Ray)."""

from __future__ import annotations

from training.train_config import ModelSection, TrainConfig

__all__ = ["ModelSection", "TrainConfig"]
