"""Balanced shard boundaries: known answers and invariants."""

from __future__ import annotations

import random

import pytest

from pipelines.shard_packing import balanced_boundaries


def test_known_answers() -> None:
    assert balanced_boundaries([], 10) == []
    assert balanced_boundaries([5, 5, 5, 5], 10) == [(0, 2), (2, 4)]
    assert balanced_boundaries([1, 1, 1], 100) == [(0, 3)]
    # greedy filling to 10 would give [10, 10, 1]; balanced gives three shards of ~7
    assert balanced_boundaries([1] * 21, 10) == [(0, 7), (7, 14), (14, 21)]


def test_a_huge_document_gets_a_shard_of_its_own_and_nothing_is_empty() -> None:
    bounds = balanced_boundaries([1, 100, 1, 1], 10)
    assert all(end > start for start, end in bounds)
    assert (1, 2) in bounds


@pytest.mark.parametrize("seed", range(20))
def test_every_document_once_and_shards_balanced(seed: int) -> None:
    rng = random.Random(seed)
    tokens = [rng.randint(1, 300) for _ in range(rng.randint(1, 2000))]
    target = rng.randint(100, 20_000)
    bounds = balanced_boundaries(tokens, target)
    covered = [i for start, end in bounds for i in range(start, end)]
    assert covered == list(range(len(tokens)))
    sums = [sum(tokens[s:e]) for s, e in bounds]
    mean = sum(tokens) / len(bounds)
    assert all(abs(total - mean) <= max(tokens) + 1 for total in sums[:-1])
    assert len(bounds) == min(len(tokens), -(-sum(tokens) // target))


def test_target_must_be_positive() -> None:
    with pytest.raises(ValueError):
        balanced_boundaries([1], 0)
