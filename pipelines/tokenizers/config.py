"""The ``tokenizers`` section of the config: the tokenizers' own models and the warm-up
budget, defined in :mod:`tokenization.config` (light: pydantic only, no torch)."""

from __future__ import annotations

from tokenization.config import TokenizersConfig, WarmupConfig

__all__ = ["TokenizersConfig", "WarmupConfig"]
