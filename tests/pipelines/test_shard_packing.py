"""Balanced shard boundaries: known answers and invariants."""

from __future__ import annotations

import random

import pytest

from pipelines.shard.packing import balanced_boundaries
from pipelines.shard.plan import plan_shards
from pipelines.shard.readers import Split


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


def _split(fmt: str, key: int) -> Split:
    return Split(fmt, f"/data/{key}", "ns/file", "/data", part=key, start=0, end=1)


def test_plan_marks_later_duplicates_and_keeps_tars_whole() -> None:
    jsonl = [_split("jsonl", i) for i in range(4)]
    tar = _split("webdataset", 9)
    splits = [jsonl[0], jsonl[1], tar, jsonl[2], jsonl[3]]
    scans = {
        jsonl[0].key: {"est_tokens": 10, "hashes": [1, 2]},
        jsonl[1].key: {"est_tokens": 10, "hashes": [3, 1]},  # 1 again: a duplicate
        jsonl[2].key: {"est_tokens": 10, "hashes": [4]},
        jsonl[3].key: {"est_tokens": 10, "hashes": [2, 5]},  # 2 again
    }
    specs = plan_shards(splits, scans, target_tokens=10)
    assert [[s["part"] for s in spec.splits] for spec in specs] == [[0], [1], [9], [2], [3]]
    assert [spec.name for spec in specs][:2] == ["part-00000.parquet", "part-00001.parquet"]
    assert specs[1].duplicates == {jsonl[1].key: [1]}
    assert specs[4].duplicates == {jsonl[3].key: [0]}
    assert specs[2].est_tokens == 0 and specs[2].duplicates == {}


def test_plan_groups_small_splits_up_to_the_target() -> None:
    splits = [_split("jsonl", i) for i in range(6)]
    scans = {s.key: {"est_tokens": 5, "hashes": [i]} for i, s in enumerate(splits)}
    specs = plan_shards(splits, scans, target_tokens=10)
    assert [len(spec.splits) for spec in specs] == [2, 2, 2]
    assert all(spec.est_tokens == 10 for spec in specs)
