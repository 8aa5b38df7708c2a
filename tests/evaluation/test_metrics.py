"""Each metric against cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from evaluation.metrics import (
    bleu,
    image_quality,
    mel_l1,
    ranks,
    retrieval_metrics,
    wer,
    within_one_block,
)


def test_ranks_and_recall_with_chance_levels() -> None:
    similarity = torch.tensor([[0.9, 0.1, 0.3], [0.8, 0.2, 0.1], [0.1, 0.3, 0.5]])
    # query 1's match (0.2) is beaten by 0.8: rank 2; the others rank first
    assert ranks(similarity).tolist() == [1, 2, 1]
    metrics = retrieval_metrics(similarity)
    assert metrics["r1"] == pytest.approx(2 / 3)
    assert metrics["r5"] == metrics["r10"] == 1.0
    assert metrics["median_rank"] == 1.0
    assert metrics["chance_r1"] == pytest.approx(1 / 3) and metrics["chance_r5"] == 1.0
    assert metrics["chance_median_rank"] == 2.0


def test_a_tie_counts_against_the_query_and_an_even_median_is_the_middle_mean() -> None:
    similarity = torch.tensor([[0.5, 0.5], [0.9, 0.1]])  # ranks 2 and 2
    assert ranks(similarity).tolist() == [2, 2]
    four = torch.eye(4)
    four[3, 0] = 2.0  # query 3 ranks second
    assert retrieval_metrics(four)["median_rank"] == 1.0
    four[2, 0] = 2.0
    assert retrieval_metrics(four)["median_rank"] == 1.5


def test_a_duplicate_candidate_is_a_hit_when_the_caller_names_it_a_positive() -> None:
    # candidates 0 and 1 are the same image: both score 0.9 for either of their captions
    similarity = torch.tensor(
        [[0.9, 0.9, 0.1, 0.2], [0.9, 0.9, 0.3, 0.1], [0.2, 0.2, 0.8, 0.1], [0.1, 0.1, 0.2, 0.7]]
    )
    assert ranks(similarity).tolist() == [2, 2, 1, 1]  # the diagonal alone: twins are misses
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True
    assert ranks(similarity, positives).tolist() == [1, 1, 1, 1]
    metrics = retrieval_metrics(similarity, positives)
    assert metrics["r1"] == 1.0 and metrics["median_rank"] == 1.0


def test_any_positive_within_k_is_a_hit_and_a_tie_with_a_negative_still_counts() -> None:
    # query 0 has positives 1 and 3; its best (3, 0.6) is beaten by negative 0 (0.8)
    # and tied by negative 2 (0.6): rank 3; a collapsed row (all equal) ranks last
    similarity = torch.tensor([[0.8, 0.1, 0.6, 0.6], [0.5, 0.5, 0.5, 0.5]])
    positives = torch.tensor([[False, True, False, True], [True, False, False, False]])
    assert ranks(similarity, positives).tolist() == [3, 4]
    metrics = retrieval_metrics(similarity, positives)
    assert metrics["r1"] == 0.0 and metrics["r5"] == 1.0


def test_chance_levels_count_every_positive() -> None:
    # 4 candidates; query 0 has 2 positives, query 1 has 1:
    # chance r1 = mean(2/4, 1/4); r2 would be mean(1 - C(2,2)/C(4,2), 2/4) (not reported)
    # r5 = 1 for both; expected first-positive rank (M+1)/(P+1) = 5/3 and 5/2
    similarity = torch.rand(2, 4)
    positives = torch.tensor([[True, True, False, False], [False, False, True, False]])
    metrics = retrieval_metrics(similarity, positives)
    assert metrics["chance_r1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert metrics["chance_r5"] == metrics["chance_r10"] == 1.0
    assert metrics["chance_median_rank"] == pytest.approx((5 / 3 + 5 / 2) / 2)
    # one positive each: the familiar k/M and (M + 1) / 2
    single = retrieval_metrics(torch.rand(20, 20))
    assert single["chance_r5"] == pytest.approx(5 / 20) and single["chance_median_rank"] == 10.5


def test_a_query_without_a_positive_is_refused() -> None:
    with pytest.raises(ValueError, match="no positive"):
        ranks(torch.rand(2, 3), torch.tensor([[True, False, False], [False] * 3]))
    with pytest.raises(ValueError, match="must match"):
        ranks(torch.rand(2, 3), torch.ones(3, 2, dtype=torch.bool))


def test_bleu_by_hand() -> None:
    # modified n-gram precisions 5/6, 3/5, 2/4, 1/3; smoothing adds 1 above unigrams:
    # (5/6 * 4/6 * 3/5 * 2/4) ** (1/4), brevity penalty 1 (same length)
    expected = (5 / 6 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected)
    assert bleu(["a b c d"], ["a b c d"]) == pytest.approx(1.0)


def test_wer_by_hand() -> None:
    # one substitution (b -> x) and one deletion (d) over four reference words
    assert wer(["a b c"], ["a x c d"]) == pytest.approx(0.5)
    assert wer(["same words", "x"], ["same words", "x"]) == 0.0


def test_psnr_and_ssim_of_flat_images() -> None:
    generated = torch.full((2, 3, 16, 16), 0.5)
    reference = torch.full((2, 3, 16, 16), 0.6)
    quality = image_quality(generated, reference)
    assert quality["psnr"] == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-4)  # MSE 0.01
    # flat images: only the luminance term (2 mx my + C1) / (mx^2 + my^2 + C1), C1 = 1e-4
    assert quality["ssim"] == pytest.approx((0.6 + 1e-4) / (0.61 + 1e-4), rel=1e-4)


def test_mel_l1_over_common_frames() -> None:
    assert mel_l1(torch.ones(2, 3), torch.zeros(2, 4)) == 1.0
    with pytest.raises(ValueError):
        mel_l1(torch.ones(2, 3), torch.zeros(3, 3))


def test_within_one_block() -> None:
    # references 10, 40, 40 pad to 32, 64, 64; chosen 32, 64, 128: the last is 64 away
    chosen, reference = torch.tensor([32, 64, 128]), torch.tensor([10, 40, 40])
    assert within_one_block(chosen, reference, 32) == pytest.approx(2 / 3)
