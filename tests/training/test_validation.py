"""Held-out loss while training: the eval split's first samples, every rank in step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.test_trainer_parts import BOS, EOS, PAD, objective, tiny_model
from tokenization.sequences import Span, TokenSequence
from tokenization.token_samples import TokenSample, encode_sample, write_tar
from training.validation import Validation, first_eval_samples


def text_sample(key: str, length: int, split: str = "eval") -> TokenSample:
    ids = torch.tensor([BOS] + [5 + len(key) % 50] * (length - 2) + [EOS])
    meta = {"instruction_length": 1, "bucket": "text", "split": split}
    return TokenSample(key, ids, torch.zeros_like(ids, dtype=torch.uint8), meta)


def test_first_eval_samples_skips_other_splits_and_over_long_ones(tmp_path: Path) -> None:
    encoded = []
    for i, (split, length) in enumerate(
        [("train", 6), ("eval", 6), ("eval", 40), ("eval", 8), ("train", 6), ("eval", 6)]
    ):
        tokens = np.array([BOS] + [7] * (length - 2) + [EOS], dtype=np.int32)
        sequence = TokenSequence(
            bucket="text", tokens=tokens, modality=np.zeros(length, dtype=np.uint8),
            instruction_length=1, spans=[Span("text", 0, length)],
        )  # fmt: skip
        encoded.append(encode_sample(f"d{i}-text", sequence, {"split": split}))
    tar = tmp_path / "000000-000.tar"
    tar.write_bytes(write_tar(encoded))
    chosen = first_eval_samples([str(tar)], limit=2, max_length=10)
    assert [s.key for s in chosen] == ["d1-text", "d3-text"]
    assert first_eval_samples([str(tar)], limit=0, max_length=10) == []


def test_every_rank_runs_as_many_batches_and_the_padding_counts_nothing() -> None:
    samples = {"text": [text_sample(f"k{i}", 6) for i in range(5)], "image2text": []}
    ranks = [Validation(samples, r, 2, 2, PAD, 4, seed=0) for r in range(2)]
    assert [v.buckets for v in ranks] == [["text"], ["text"]]  # a bucket with none is left out
    # 5 samples over 2 ranks: 3 and 2, i.e. 2 batches and 1 batch + 1 uncounted repeat.
    assert [len(v.batches["text"]) for v in ranks] == [2, 2]
    assert [counted for _, counted in ranks[1].batches["text"]] == [True, False]

    model = tiny_model()
    model.eval()
    obj = objective(model)
    sums = [v.sums(obj, obj, torch.device("cpu")) for v in ranks]
    assert sums[1][1] > 0
    alone = Validation({"text": samples["text"][1::2]}, 0, 1, 2, PAD, 4, seed=0)
    # Rank 1's share scored alone (one counted batch, same seed and position) gives its sums.
    assert alone.sums(obj, obj, torch.device("cpu")) == pytest.approx(sums[1])
    # Seeded by position: a second evaluation of the same weights gives the same figures.
    assert ranks[0].sums(obj, obj, torch.device("cpu")) == sums[0]

    reduced = [a + b for a, b in zip(sums[0], sums[1], strict=True)]
    metrics = ranks[0].metrics(reduced)
    assert metrics["val/loss"] == pytest.approx(reduced[0] / reduced[1])
    assert metrics["val/loss_ce_text"] == metrics["val/loss"]


def test_a_rank_with_no_sample_of_its_own_still_runs_its_batches() -> None:
    samples = {"text": [text_sample("only", 6)]}
    spare = Validation(samples, 1, 2, 4, PAD, 4, seed=0)
    assert [counted for _, counted in spare.batches["text"]] == [False]
    obj = objective(tiny_model())
    assert spare.sums(obj, obj, torch.device("cpu")) == [0.0, 0.0]
    assert spare.metrics([0.0, 0.0]) == {}
