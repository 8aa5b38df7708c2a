"""Which bucket each micro-batch draws from: smooth weighted round-robin (nginx's SWRR).

Every draw, each bucket's ``current`` grows by its weight; the largest (ties: the first
bucket in sorted name order) is drawn and gives back the total weight. The sequence
depends only on the weights, so every rank computes the same one with no communication,
and the state is one number per bucket. Unlike random draws, SWRR interleaves: equal
weights give a strict rotation, integer weights repeat exactly every ``sum(weights)``
draws, and no bucket is ever one draw or more ahead of its share ``n * w / sum(w)`` (the
drawn bucket's ``current`` stays above ``-sum(w)``). Behind its share, a bucket stays
within one draw for up to four buckets (measured); with many very uneven weights it can
lag slightly more.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any


class BucketSchedule:
    """Deterministic bucket for each micro-batch: smooth weighted round-robin over buckets
    by weight; the same sequence on every rank."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not weights:
            raise ValueError("BucketSchedule needs at least one bucket")
        for bucket, weight in weights.items():
            real = isinstance(weight, numbers.Real) and not isinstance(weight, bool)
            if not (real and math.isfinite(weight) and weight > 0):
                raise ValueError(
                    f"bucket {bucket!r}: weight must be finite and > 0, got {weight!r}"
                )
        self.weights = {bucket: float(weights[bucket]) for bucket in sorted(weights)}
        self.total = sum(self.weights.values())
        self.current = dict.fromkeys(self.weights, 0.0)

    def next(self) -> str:
        """The bucket of the next micro-batch."""
        for bucket, weight in self.weights.items():
            self.current[bucket] += weight
        chosen = max(self.current, key=self.current.__getitem__)  # first maximum in name order
        self.current[chosen] -= self.total
        return chosen

    def state_dict(self) -> dict[str, Any]:
        """``{"current": {bucket: float}}``: plain JSON for checkpoints."""
        return {"current": dict(self.current)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`; ValueError if its buckets differ from the weights'.

        Weights may change between runs (same buckets): the ``current`` values still sum to
        zero, so the rotation continues at the new proportions.
        """
        current = state["current"]
        if set(current) != set(self.weights):
            raise ValueError(
                f"schedule state has buckets {sorted(current)}, weights have {sorted(self.weights)}"
            )
        self.current = {bucket: float(current[bucket]) for bucket in self.weights}
