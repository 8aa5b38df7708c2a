"""Cutting an ordered list of documents into shards of balanced estimated tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence


def balanced_boundaries(tokens: Sequence[int], target_tokens: int) -> list[tuple[int, int]]:
    """Split ``tokens`` (one estimate per document, in order) into contiguous shards.

    The shard count is ``ceil(total / target_tokens)``; boundaries fall where the running
    sum crosses each multiple of ``total / count``, so every shard holds about the same
    number of tokens (within one document's tokens) instead of the greedy "fill to target,
    leave a runt at the end". Order is kept, so the result is deterministic.

    Returns half-open ``(start, end)`` index ranges covering every document exactly once.
    """
    if target_tokens <= 0:
        raise ValueError("target_tokens must be positive")
    count = len(tokens)
    if count == 0:
        return []
    total = sum(tokens)
    shards = max(1, min(count, math.ceil(total / target_tokens)))
    per_shard = total / shards
    boundaries, start, running = [], 0, 0
    for index, value in enumerate(tokens):
        running += value
        remaining_docs = count - index - 1
        remaining_shards = shards - len(boundaries) - 1
        crossed = running >= per_shard * (len(boundaries) + 1)
        if remaining_shards > 0 and (crossed or remaining_docs == remaining_shards):
            boundaries.append((start, index + 1))
            start = index + 1
    boundaries.append((start, count))
    return boundaries
