"""The ``eval`` section of the config (suites and the sweep's settings), defined in
:mod:`evaluation.config` (light: pydantic only, no torch or MLflow)."""

from __future__ import annotations

from evaluation.config import EvalConfig, SuiteConfig

__all__ = ["EvalConfig", "SuiteConfig"]
