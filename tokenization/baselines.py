"""Trivial codecs with a tokenizer's exact token budget: the bar a learned tokenizer must clear.

A tokenizer that spends ``h x w`` ids from a codebook of ``C`` codes on an image (or one id
per span of mel frames on a clip) is only worth its decoder if it beats the simplest codec
with the same budget:

- :class:`ImagePalette`: each ``p x p`` block's mean colour (an ``h x w`` thumbnail) snapped
  to a ``C``-colour palette learned by k-means on training images, upsampled bicubically;
- :class:`MelPalette`: each token span's mean log-mel frame snapped to a ``C``-entry palette
  learned by k-means on training clips, repeated over the span.

Both are fitted on the training media and scored on held-out media by the benchmark
(``benchmarks/tokenizer_quality.py``) and by ``omni tokenizers eval``, beside the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from tokenization.audio_trainer import mel_l1
from tokenization.image_trainer import psnr
from tokenization.quantizer import kmeans


def _snap(points: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Each row of ``points`` (M, d) replaced by its nearest ``palette`` row (C, d)."""
    return palette[torch.cdist(points, palette).argmin(-1)]


class ImagePalette:
    """Block-mean thumbnail, palette-snapped, bicubic upsample: ``(side / block)^2`` ids of
    ``len(palette)`` colours per image, as an image tokenizer's grid and codebook."""

    def __init__(self, palette: torch.Tensor, block: int) -> None:
        self.palette, self.block = palette, block

    @classmethod
    def fit(cls, pixels: torch.Tensor, block: int, colours: int, seed: int = 0) -> ImagePalette:
        """Palette by k-means of the block means of training ``pixels`` (M, 3, R, R) in [0, 1]."""
        means = F.avg_pool2d(pixels.float(), block).permute(0, 2, 3, 1).reshape(-1, 3)
        generator = torch.Generator().manual_seed(seed)
        palette, _ = kmeans(means, colours, generator=generator, restarts=2)
        return cls(palette, block)

    def reconstruct(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [0, 1] -> its palette-thumbnail reconstruction, clamped to [0, 1]."""
        means = F.avg_pool2d(pixels.float(), self.block)  # (B, 3, h, w)
        b, _, h, w = means.shape
        snapped = _snap(means.permute(0, 2, 3, 1).reshape(-1, 3), self.palette)
        thumbnail = snapped.reshape(b, h, w, 3).permute(0, 3, 1, 2)
        upsampled = F.interpolate(thumbnail, size=pixels.shape[-2:], mode="bicubic")
        return upsampled.clamp(0, 1)


def span_means(mel: torch.Tensor, span: int) -> torch.Tensor:
    """(n_mels, F) -> (ceil(F / span), n_mels): the mean frame of each token span (the last
    span may be shorter)."""
    return torch.stack([chunk.mean(-1) for chunk in mel.float().split(span, dim=-1)])


class MelPalette:
    """Span-mean log-mel frames, palette-snapped, repeated: one id of ``len(palette)`` per
    ``span`` mel frames, as the audio tokenizer's token rate and codebook."""

    def __init__(self, palette: torch.Tensor, span: int) -> None:
        self.palette, self.span = palette, span

    @classmethod
    def fit(
        cls, mels: Sequence[torch.Tensor], span: int, entries: int, seed: int = 0
    ) -> MelPalette:
        """Palette by k-means of the span means of training log-mels ``[(n_mels, F_i), ...]``."""
        means = torch.cat([span_means(mel, span) for mel in mels])
        generator = torch.Generator().manual_seed(seed)
        palette, _ = kmeans(means, entries, generator=generator, restarts=2)
        return cls(palette, span)

    def reconstruct(self, mel: torch.Tensor) -> torch.Tensor:
        """(n_mels, F) -> (n_mels, F): each span's frames replaced by its snapped mean."""
        snapped = _snap(span_means(mel, self.span), self.palette)  # (T, n_mels)
        return snapped.repeat_interleave(self.span, dim=0)[: mel.shape[-1]].T


def image_scores(rebuilt: torch.Tensor, pixels: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB) and SSIM of reconstructions ``rebuilt`` against ``pixels``, both
    (B, 3, R, R) in [0, 1]."""
    rebuilt, pixels = rebuilt.detach().float().clamp(0, 1), pixels.detach().float()
    ssim = structural_similarity_index_measure(rebuilt, pixels, data_range=1.0, reduction="none")
    return [psnr(a, b) for a, b in zip(rebuilt, pixels, strict=True)], ssim.flatten().tolist()


def palette_quality(
    train_pixels: torch.Tensor,
    train_mels: Sequence[torch.Tensor],
    eval_pixels: torch.Tensor | None,
    eval_mels: Sequence[torch.Tensor],
    block: int,
    colours: int,
    span: int,
    entries: int,
    seed: int = 0,
) -> dict[str, float]:
    """The palette codecs fitted on the training media, scored on the held-out media under
    the tokenizers' metric names: ``image_psnr``, ``image_ssim`` (means per image) and
    ``audio_mel_l1`` (mean per clip), each only where both sides have media."""
    result: dict[str, float] = {}
    if len(train_pixels) and eval_pixels is not None and len(eval_pixels):
        codec = ImagePalette.fit(train_pixels, block, colours, seed)
        psnrs, ssims = image_scores(codec.reconstruct(eval_pixels), eval_pixels)
        result |= {"image_psnr": float(np.mean(psnrs)), "image_ssim": float(np.mean(ssims))}
    if train_mels and eval_mels:
        codec = MelPalette.fit(train_mels, span, entries, seed)
        errors = [
            mel_l1(codec.reconstruct(mel)[None], mel[None].float(), torch.tensor([mel.shape[-1]]))
            for mel in eval_mels
        ]
        result["audio_mel_l1"] = float(np.mean(errors))
    return result
