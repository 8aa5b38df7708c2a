"""The tokenizer warm-up: train the image and audio tokenizers, measure them before and after.

NExT-OMNI warms its encoders up with reconstruction plus semantic alignment
(L_total = L_rec + L_sem) before DFM training; the trainers own the losses, this module
owns the loop: sampling batches, the step and time budget, logging, and the held-out
quality measures (image PSNR, audio mel-L1, codebook usage) that tell whether it worked.
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from tokenization.audio import AudioTokenizer, pad_mels
from tokenization.audio_trainer import AudioTokenizerTrainer, AudioTrainerConfig, mel_l1
from tokenization.baselines import image_scores
from tokenization.image import ImageTokenizer
from tokenization.image_trainer import ImageTokenizerTrainer, ImageTrainerConfig
from tokenization.text import TextTokenizer

MetricsLogger = Callable[[dict[str, float], int], None]
StepFunction = Callable[[list[int], float], dict[str, float]]  # (indices, progress) -> metrics


@dataclass
class ImageSample:
    """One training image: ``pixels`` (3, R, R) in [0, 1], its caption, if any, and
    optionally the same image at a higher resolution, (3, S, S), to cut training crops from."""

    pixels: torch.Tensor
    caption: str | None = None
    source: torch.Tensor | None = None


@dataclass
class AudioSample:
    """One clip: ``mel`` (n_mels, frames) log-mel and its transcript, if any."""

    mel: torch.Tensor
    transcript: str | None = None


@dataclass
class WarmupData:
    """Media for the warm-up, split by content (a medium is on one side wherever it occurs)."""

    texts: list[str] = field(default_factory=list)
    train_images: list[ImageSample] = field(default_factory=list)
    eval_images: list[ImageSample] = field(default_factory=list)
    train_audio: list[AudioSample] = field(default_factory=list)
    eval_audio: list[AudioSample] = field(default_factory=list)


def _batches(count: int, size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of indices, each a fresh shuffle pass's slice (deterministic)."""
    rng, order, batches = random.Random(seed), [], []
    for _ in range(steps):
        if len(order) < min(size, count):
            extra = list(range(count))
            rng.shuffle(extra)
            order += extra
        batches.append(order[:size])
        order = order[size:]
    return batches


def distinct(
    tensors: Sequence[torch.Tensor], limit: int | None = None, seed: int = 0
) -> list[torch.Tensor]:
    """The tensors without repeats (a clip used by several documents counts once); beyond
    ``limit`` a seeded random subset of them, in their order."""
    seen: dict[bytes, torch.Tensor] = {}
    for tensor in tensors:
        seen.setdefault(tensor.cpu().numpy().tobytes(), tensor)
    unique = list(seen.values())
    if limit is None or len(unique) <= limit:
        return unique
    keep = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))[:limit]
    return [unique[i] for i in sorted(keep.tolist())]


def _caption_ids(text: TextTokenizer, captions: Sequence[str | None]) -> list[list[int]] | None:
    if any(c is None for c in captions):
        return None
    return text.encode(list(captions))  # type: ignore[arg-type]


@torch.no_grad()
def evaluate_images(
    tokenizer: ImageTokenizer, samples: Sequence[ImageSample], batch: int = 32
) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of decode(encode(x)) against x, and the share of codes used."""
    if not samples:
        return {}
    device = next(tokenizer.parameters()).device
    tokenizer.eval()
    psnrs, ssims, codes = [], [], set()
    for start in range(0, len(samples), batch):
        pixels = torch.stack([s.pixels for s in samples[start : start + batch]]).to(device)
        ids = tokenizer.encode(pixels)
        codes.update(ids.flatten().tolist())
        scores = image_scores(tokenizer.decode(ids), pixels)
        psnrs += scores[0]
        ssims += scores[1]
    return {
        "image_psnr": float(np.mean(psnrs)),
        "image_ssim": float(np.mean(ssims)),
        "image_usage": len(codes) / tokenizer.quantizer.vocab_size,
        "image_tokens_per_item": float(tokenizer.tokens_per_image),
    }


@torch.no_grad()
def evaluate_audio(tokenizer: AudioTokenizer, samples: Sequence[AudioSample]) -> dict[str, float]:
    """Mean mel-L1 of the reconstruction over valid frames, and the share of codes used."""
    if not samples:
        return {}
    tokenizer.eval()
    errors, codes, tokens = [], set(), []
    for sample in samples:
        mels, lengths = pad_mels([sample.mel.to(next(tokenizer.parameters()).device)])
        rebuilt, output, _, token_lengths = tokenizer(mels, lengths)
        valid = int(token_lengths[0]) * tokenizer.quantizer.tokens_per_vector
        codes.update(output.ids[0, :valid].tolist())
        tokens.append(valid)
        errors.append(mel_l1(rebuilt, mels, lengths))
    return {
        "audio_mel_l1": float(np.mean(errors)),
        "audio_usage": len(codes) / tokenizer.quantizer.vocab_size,
        "audio_tokens_per_item": float(np.mean(tokens)),
    }


@dataclass(frozen=True)
class LoopBudget:
    """How long a warm-up loop runs and how it reports."""

    steps: int
    batch: int
    seed: int
    deadline: float  # time.monotonic() value after which no new step starts
    log: MetricsLogger
    log_every: int
    initialise_limit: int | None = None  # distinct media the data-driven start is fitted on


def _run_loop(name: str, count: int, budget: LoopBudget, step: StepFunction) -> int:
    """Call ``step`` on batches of sample indices within the budget; returns steps done.

    ``step`` also gets the share of the budget spent, steps or seconds, whichever is
    further along, so a learning-rate schedule ends on time when the clock decides.
    """
    done = 0
    batches = _batches(count, budget.batch, budget.steps, budget.seed) if count else []
    started = time.monotonic()
    seconds = budget.deadline - started
    for index, indices in enumerate(tqdm(batches, desc=name)):
        now = time.monotonic()
        if now > budget.deadline:
            break
        progress = max(index / budget.steps, (now - started) / seconds if seconds > 0 else 1.0)
        metrics = step(indices, progress)
        done = index + 1
        if index % budget.log_every == 0 or done == budget.steps:
            budget.log({f"{name}/{key}": value for key, value in metrics.items()}, index)
    return done


def train_images(
    tokenizer: ImageTokenizer,
    config: ImageTrainerConfig,
    samples: Sequence[ImageSample],
    text: TextTokenizer,
    budget: LoopBudget,
) -> int:
    """Warm the image tokenizer up (reconstruction, VQ, GAN, caption contrast); steps done.

    With training images, the tokenizer first starts from the data
    (:meth:`ImageTokenizer.initialise`: PCA, k-means and least-squares fits, seconds).
    """
    trainer = ImageTokenizerTrainer(tokenizer, config)
    device = next(tokenizer.parameters()).device
    if samples and budget.steps:
        start = distinct([s.pixels for s in samples], budget.initialise_limit, budget.seed)
        tokenizer.initialise(torch.stack(start), seed=budget.seed)

    def step(indices: list[int], progress: float) -> dict[str, float]:
        chosen = [samples[i] for i in indices]
        sources = [s.source for s in chosen]
        if any(source is None for source in sources):  # crops need every image's source
            sources = [s.pixels for s in chosen]
        pixels = torch.stack(sources).to(device)  # type: ignore[arg-type]
        return trainer.step(pixels, _caption_ids(text, [s.caption for s in chosen]), progress)

    return _run_loop("image", len(samples), budget, step)


def train_audio(
    tokenizer: AudioTokenizer,
    config: AudioTrainerConfig,
    samples: Sequence[AudioSample],
    text: TextTokenizer,
    budget: LoopBudget,
) -> int:
    """Warm the audio tokenizer up (mel reconstruction, VQ, transcript alignment); steps done.

    With training clips, the tokenizer first starts from the data
    (:meth:`AudioTokenizer.initialise`: PCA, k-means and least-squares fits, seconds).
    """
    trainer = AudioTokenizerTrainer(tokenizer, config)
    device = next(tokenizer.parameters()).device
    if samples and budget.steps:
        start = distinct([s.mel for s in samples], budget.initialise_limit, budget.seed)
        tokenizer.initialise(start, seed=budget.seed)

    def step(indices: list[int], progress: float) -> dict[str, float]:
        chosen = [samples[i] for i in indices]
        mels, lengths = pad_mels([s.mel.to(device) for s in chosen])
        ids = _caption_ids(text, [s.transcript for s in chosen])
        return trainer.step(mels, lengths, ids, progress)

    return _run_loop("audio", len(samples), budget, step)


def image_grid(rows: Sequence[torch.Tensor]) -> bytes:
    """PNG of image rows: each row (N, 3, R, R) in [0, 1] laid side by side, rows stacked."""
    strips = [torch.cat(list(row.detach().float().cpu()), dim=-1) for row in rows]
    grid = (torch.cat(strips, dim=-2).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def reconstructions(tokenizer: ImageTokenizer, pixels: torch.Tensor) -> torch.Tensor:
    """decode(encode(pixels)) for (B, 3, R, R) in [0, 1], on ``pixels``' device."""
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    return tokenizer.decode(tokenizer.encode(pixels.to(device))).to(pixels.device)


def reconstruction_grid(tokenizer: ImageTokenizer, samples: Sequence[ImageSample]) -> bytes:
    """PNG: originals on the top row, their reconstructions below (up to 8 images)."""
    pixels = torch.stack([s.pixels for s in samples[:8]])
    return image_grid([pixels, reconstructions(tokenizer, pixels)])
