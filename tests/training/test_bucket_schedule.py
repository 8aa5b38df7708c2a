"""BucketSchedule: SWRR shares, exact periods, interleaving, state round trip, bad weights."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from training.bucket_schedule import BucketSchedule


def draws(schedule: BucketSchedule, n: int) -> list[str]:
    return [schedule.next() for _ in range(n)]


def test_integer_weights_repeat_exactly_every_period() -> None:
    weights = {"text": 5, "image2text": 3, "text2image": 2, "audio2text": 1}
    period = sum(weights.values())
    sequence = draws(BucketSchedule(weights), 20 * period)
    assert sequence[:period] * 20 == sequence
    for k in range(1, 21):
        assert Counter(sequence[: k * period]) == {b: k * w for b, w in weights.items()}


def test_nginx_sequence_and_name_order_ties() -> None:
    # nginx's own example (weights 5, 1, 1): a a b a c a a; ties go to the first name.
    assert "".join(draws(BucketSchedule({"a": 5, "b": 1, "c": 1}), 7)) == "aabacaa"
    assert draws(BucketSchedule({"b": 1, "a": 1}), 2) == ["a", "b"]


def test_float_weights_stay_within_one_draw_of_their_share_at_every_prefix() -> None:
    weights = {"text": 0.37, "image2text": 0.21, "text2image": 0.3, "interleaved": 0.12}
    total = sum(weights.values())
    counts = Counter()
    for n, bucket in enumerate(draws(BucketSchedule(weights), 10_000), 1):
        counts[bucket] += 1
        for name, weight in weights.items():
            assert abs(counts[name] - n * weight / total) < 1, (n, name)


def test_no_bucket_is_ever_a_draw_ahead_of_its_share_with_many_uneven_weights() -> None:
    rng = np.random.default_rng(0)
    weights = {f"b{i}": float(w) for i, w in enumerate(rng.uniform(0.01, 10, 9))}
    total = sum(weights.values())
    counts = Counter()
    for n, bucket in enumerate(draws(BucketSchedule(weights), 3000), 1):
        counts[bucket] += 1
        assert counts[bucket] - n * weights[bucket] / total < 1


def test_equal_weights_rotate_with_no_runs() -> None:
    sequence = draws(BucketSchedule(dict.fromkeys(["c", "a", "b", "d"], 2.5)), 400)
    assert max(len(list(run)) for _, run in itertools.groupby(sequence)) == 1
    assert sequence[:4] == ["a", "b", "c", "d"]


def test_two_instances_give_the_same_sequence_whatever_the_mapping_order() -> None:
    weights = {"text": 0.5, "image2text": 0.3, "audio2text": 0.2}
    reordered = dict(reversed(list(weights.items())))
    assert draws(BucketSchedule(weights), 500) == draws(BucketSchedule(reordered), 500)


@pytest.mark.parametrize("weights", [{"a": 3, "b": 2, "c": 2}, {"a": 0.7, "b": 0.2, "c": 0.1}])
def test_state_round_trip_continues_the_sequence(weights: dict[str, float]) -> None:
    reference = draws(BucketSchedule(weights), 300)
    for n in (0, 1, 6, 7, 123):
        schedule = BucketSchedule(weights)
        draws(schedule, n)
        saved = json.loads(json.dumps(schedule.state_dict()))
        resumed = BucketSchedule(weights)
        resumed.load_state_dict(saved)
        assert draws(resumed, 300 - n) == reference[n:]


def test_state_of_other_buckets_is_refused() -> None:
    state = BucketSchedule({"a": 1, "b": 1}).state_dict()
    with pytest.raises(ValueError, match="buckets"):
        BucketSchedule({"a": 1, "c": 1}).load_state_dict(state)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_non_positive_or_non_numeric_weights_are_refused_by_name(bad: object) -> None:
    with pytest.raises(ValueError, match="'audio2text'"):
        BucketSchedule({"text": 1.0, "audio2text": bad})  # type: ignore[dict-item]


def test_no_buckets_is_refused() -> None:
    with pytest.raises(ValueError):
        BucketSchedule({})
