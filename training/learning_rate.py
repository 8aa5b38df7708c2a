"""The learning-rate schedule: linear warm-up, then cosine, linear or constant decay.

A pure function of the step (``LambdaLR``), so a resumed run follows the same curve; the
multiplier reaches ``min_lr_ratio`` at ``max_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from training.train_config import TrainConfig


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of ``config.lr`` for the optimizer step about to be taken (0-based)."""
    warmup, total, floor = config.warmup_steps, config.max_steps, config.min_lr_ratio
    schedule = config.lr_schedule

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
