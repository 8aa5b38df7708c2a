"""Metrics of the evaluation tasks: pure functions of tensors and strings, no I/O.

Text and image metrics come from ``torchmetrics`` (BLEU, WER, PSNR, SSIM) rather than
hand-written formulas; what is ours is only the retrieval ranking (recall@k and median
rank from a similarity matrix, with the chance level of each), the mel-spectrogram L1
and the DGS length check, each a few lines with its definition in the docstring.
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
from torchmetrics.functional.text import bleu_score, word_error_rate

RECALL_AT = (1, 5, 10)


def ranks(similarity: Tensor) -> Tensor:
    """Float[N, N] similarity (query i, candidate j; the match of i is j = i) -> Long[N],
    the 1-based rank of each query's match among all candidates (ties count against it)."""
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square (N, N), got {tuple(similarity.shape)}")
    matched = similarity.diagonal()[:, None]
    return (similarity >= matched).sum(1)


def retrieval_metrics(similarity: Tensor) -> dict[str, float]:
    """Recall@{1,5,10} (share of queries whose match ranks within k) and the median rank,
    over queries of Float[N, N] ``similarity``; ``chance_*`` are the same under a random
    ranking: recall@k = min(k, N) / N, median rank = (N + 1) / 2."""
    rank = ranks(similarity).float()
    n = rank.numel()
    out: dict[str, float] = {}
    for k in RECALL_AT:
        out[f"r{k}"] = float((rank <= k).float().mean())
        out[f"chance_r{k}"] = min(k, n) / n
    out["median_rank"] = float(rank.quantile(0.5))  # the mean of the middle two if N even
    out["chance_median_rank"] = (n + 1) / 2
    return out


def bleu(predictions: list[str], references: list[str], n_gram: int = 4) -> float:
    """Corpus BLEU-``n_gram`` in [0, 1] (one reference per prediction, smoothed so that a
    short caption with no 4-gram match is not simply 0)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    score = bleu_score(predictions, [[r] for r in references], n_gram=n_gram, smooth=True)
    return float(score)


def wer(predictions: list[str], references: list[str]) -> float:
    """Word error rate: (substitutions + deletions + insertions) / reference words."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return float(word_error_rate(predictions, references))


def image_quality(generated: Tensor, reference: Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of Float[B, 3, H, W] images in [0, 1], averaged over the batch."""
    if generated.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(generated.shape)} vs {tuple(reference.shape)}")
    generated, reference = generated.float(), reference.float()
    psnr = peak_signal_noise_ratio(generated, reference, data_range=1.0, dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(generated, reference, data_range=1.0)
    return {"psnr": float(psnr), "ssim": float(ssim)}


def mel_l1(generated: Tensor, reference: Tensor) -> float:
    """Mean absolute difference of two log-mel spectrograms Float[n_mels, F] over their
    common frames (a generated clip may be a frame shorter or longer)."""
    frames = min(generated.shape[-1], reference.shape[-1])
    if generated.shape[:-1] != reference.shape[:-1] or frames == 0:
        raise ValueError(f"mels differ: {tuple(generated.shape)} vs {tuple(reference.shape)}")
    return float((generated[..., :frames] - reference[..., :frames]).abs().mean())


def within_one_block(chosen: Tensor, reference: Tensor, block: int) -> float:
    """Share of rows whose chosen text canvas Long[B] lies within one ``block`` of the
    reference response padded to the block (what DGS should pick): |chosen - ref| <= block."""
    padded = -(-reference // block) * block
    return float(((chosen - padded).abs() <= block).float().mean())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after lower-casing and collapsing
    whitespace (BLEU and WER give partial credit; this gives none)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references")

    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    return sum(norm(p) == norm(r) for p, r in zip(predictions, references, strict=True)) / len(
        references
    )


def label_scores(
    predicted: list[str | None], labels: list[str], classes: list[str], majority: str
) -> dict[str, float]:
    """Recognition accuracy of ``predicted`` classes against ``labels``, with the chance level
    of a uniform guess over ``classes`` and the trivial baseline of always answering the
    training majority class (``majority``)."""
    if len(predicted) != len(labels) or not labels:
        raise ValueError(f"{len(predicted)} predictions for {len(labels)} labels")
    n = len(labels)
    return {
        "accuracy": sum(p == y for p, y in zip(predicted, labels, strict=True)) / n,
        "chance": 1.0 / len(classes),
        "majority": sum(y == majority for y in labels) / n,
    }
