"""Tokenizer reconstruction quality against a trivial codec with the same token budget.

Trains the image and audio tokenizers with ``--config``'s settings (the demo's by default)
on the sample corpus's warm-up training split, then measures them on media the warm-up did
not see: the warm-up's held-out split (by media bytes, as ``omni tokenizers train``), or
every medium under ``--media``. Beside them, the palette codecs of
:mod:`tokenization.baselines` (block-mean thumbnail snapped to a k-means palette; span-mean
log-mel snapped to a palette), fitted on the same training media.

Each ``--seconds`` value is one fresh warm-up with that time budget (split between image
and audio in proportion to their steps, as the stage does; 0 = the config's step budget
alone); ``--initialise-only`` adds the data-driven start before any step. The figures of
the config's own budget (``tokenizers.warmup.max_seconds``; else the last one) go to
``benchmarks/results/tokenizer_quality.json`` as ``{name, value, baseline, ratio, target,
unit}``. Targets: image PSNR >= palette + 1 dB,
audio mel-L1 <= 0.85 x palette.

Beside the JSON: ``tokenizer_quality_grid.png``, eight held-out images (top row), then the
palette codec's reconstructions, then the tokenizer's after each run in order (the
data-driven start first with ``--initialise-only``); and ``tokenizer_quality_curve.png``,
held-out PSNR and mel-L1 against warm-up seconds with the palette codec's as lines.

    python benchmarks/tokenizer_quality.py [--config configs/sample.yaml] [--seconds 110 300]
        [--media DIR] [--initialise-only] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")  # no display on servers
from matplotlib import pyplot as plt  # noqa: E402

from pipelines.config import PipelineConfig, load_pipeline_config
from pipelines.tokenizers import stage as tokenizers_stage
from tokenization.audio import AudioTokenizer
from tokenization.baselines import ImagePalette
from tokenization.image import ImageTokenizer
from tokenization.text import TextTokenizer
from tokenization.video import VideoTokenizer
from tokenization.warmup import (
    AudioSample,
    ImageSample,
    LoopBudget,
    WarmupData,
    distinct,
    evaluate_audio,
    evaluate_images,
    image_grid,
    reconstructions,
    train_audio,
    train_images,
)

RESULTS = Path(__file__).parent / "results" / "tokenizer_quality.json"
GRID = RESULTS.with_name("tokenizer_quality_grid.png")
CURVE = RESULTS.with_name("tokenizer_quality_curve.png")
IMAGE_TARGET_DB = 1.0  # PSNR above the palette codec
AUDIO_TARGET_RATIO = 0.85  # mel-L1 as a share of the palette codec's


def corpus_documents(config: PipelineConfig) -> list[dict[str, Any]]:
    """The config's JSONL corpus inputs as shard-like documents (media bytes embedded)."""
    documents = []
    for source in config.corpus.inputs:
        path = Path(source.uri)
        for line in path.read_text().splitlines():
            document = json.loads(line)
            for segment in document["segments"]:
                media = segment.get("path")
                segment["bytes"] = (path.parent / media).read_bytes() if media else None
                segment.setdefault("text", None)
            documents.append(document)
    return documents


def _distinct_images(samples: list[ImageSample]) -> list[ImageSample]:
    return [ImageSample(pixels) for pixels in distinct([s.pixels for s in samples])]


def _distinct_clips(samples: list[AudioSample]) -> list[AudioSample]:
    return [AudioSample(mel) for mel in distinct([s.mel for s in samples])]


def warm_up(
    config: PipelineConfig, data: WarmupData, text: TextTokenizer, seconds: float
) -> tuple[ImageTokenizer, AudioTokenizer, dict[str, float]]:
    """Fresh tokenizers warmed up as the stage does, within ``seconds`` (0 = the step budget
    alone; < 0 = the data-driven initialisation alone). A budget longer than the config's
    ``max_seconds`` raises the step budgets in proportion, so that the clock decides and the
    learning-rate schedule spans the longer run. Returns them and the seconds spent."""
    settings, warmup = config.tokenizers, config.tokenizers.warmup
    torch.manual_seed(warmup.seed)
    image = ImageTokenizer.from_config(settings.image)
    audio = AudioTokenizer.from_config(settings.audio)
    spent: dict[str, float] = {}
    started = time.monotonic()
    if seconds < 0:
        train_pixels = torch.stack(distinct([s.pixels for s in data.train_images]))
        image.initialise(train_pixels, seed=warmup.seed)
        spent["image_seconds"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        audio.initialise(distinct([s.mel for s in data.train_audio]), seed=warmup.seed)
        spent["audio_seconds"] = round(time.monotonic() - started, 1)
        return image, audio, spent
    scale = max(1.0, seconds / warmup.max_seconds)
    image_steps, audio_steps = round(warmup.image_steps * scale), round(warmup.audio_steps * scale)
    share = seconds / max(1, image_steps + audio_steps) if seconds > 0 else float("inf")
    trainer = settings.image_trainer.model_copy(update={"text_vocab_size": text.vocab_size})
    deadline = started + share * image_steps
    budget = LoopBudget(image_steps, warmup.image_batch, warmup.seed, deadline, _quiet, 1)
    spent["image_steps"] = train_images(image, trainer, data.train_images, text, budget)
    spent["image_seconds"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    trainer = settings.audio_trainer.model_copy(update={"text_vocab_size": text.vocab_size})
    deadline = started + share * audio_steps
    budget = LoopBudget(audio_steps, warmup.audio_batch, warmup.seed, deadline, _quiet, 1)
    spent["audio_steps"] = train_audio(audio, trainer, data.train_audio, text, budget)
    spent["audio_seconds"] = round(time.monotonic() - started, 1)
    return image, audio, spent


def _quiet(metrics: dict[str, float], step: int) -> None:
    """No metrics logging in the benchmark."""


def entries(tokenizer: dict[str, float], palette: dict[str, float]) -> list[dict[str, Any]]:
    """The result rows: tokenizer value, palette baseline, their ratio and the target."""
    rows = []
    if "image_psnr" in tokenizer and "image_psnr" in palette:
        value, base = tokenizer["image_psnr"], palette["image_psnr"]
        rows.append(
            {"name": "image_psnr", "value": value, "baseline": base, "ratio": value / base,
             "target": base + IMAGE_TARGET_DB, "unit": "dB", "met": value >= base + IMAGE_TARGET_DB}
        )  # fmt: skip
        value, base = tokenizer["image_ssim"], palette["image_ssim"]
        rows.append(
            {"name": "image_ssim", "value": value, "baseline": base, "ratio": value / base,
             "target": None, "unit": "SSIM", "met": None}
        )  # fmt: skip
    if "audio_mel_l1" in tokenizer and "audio_mel_l1" in palette:
        value, base = tokenizer["audio_mel_l1"], palette["audio_mel_l1"]
        target = AUDIO_TARGET_RATIO * base
        rows.append(
            {"name": "audio_mel_l1", "value": value, "baseline": base, "ratio": value / base,
             "target": target, "unit": "log-mel L1", "met": value <= target}
        )  # fmt: skip
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]


def plot_curve(runs: list[dict[str, Any]], palette: dict[str, float], path: Path) -> None:
    """Held-out PSNR and mel-L1 against warm-up seconds (the start at 0 s), palette as lines."""
    seconds = [
        0.0 if r["budget_seconds"] < 0 else r.get("image_seconds", 0) + r.get("audio_seconds", 0)
        for r in runs
    ]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, key, label in (
        (axes[0], "image_psnr", "held-out image PSNR (dB), higher is better"),
        (axes[1], "audio_mel_l1", "held-out log-mel L1, lower is better"),
    ):
        values = [r["tokenizer"].get(key) for r in runs]
        axis.plot(seconds, values, "o-", label="tokenizer")
        if key in palette:
            axis.axhline(palette[key], color="grey", linestyle="--", label="palette codec")
            target = (
                palette[key] + IMAGE_TARGET_DB
                if key == "image_psnr"
                else AUDIO_TARGET_RATIO * palette[key]
            )
            axis.axhline(target, color="tab:red", linestyle=":", label="target")
        axis.set_xlabel("warm-up seconds (image + audio)")
        axis.set_title(label, fontsize=9)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/sample.yaml")
    parser.add_argument("--seconds", type=float, nargs="+", default=[110.0])
    parser.add_argument("--media", type=Path, help="measure on this folder instead")
    parser.add_argument("--initialise-only", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    config = load_pipeline_config(args.config, args.overrides)
    settings = config.tokenizers
    image = ImageTokenizer.from_config(settings.image)
    audio = AudioTokenizer.from_config(settings.audio)
    video = VideoTokenizer(image, settings.video)
    data, _ = tokenizers_stage.collect(
        iter(corpus_documents(config)),
        image,
        audio,
        video,
        0.0 if args.media else settings.warmup.eval_fraction,  # --media: train on everything
        settings.image_trainer.source_scale,
    )
    if args.media:
        data.eval_images, data.eval_audio, _, _ = tokenizers_stage.read_media(
            args.media, image, audio, video
        )
    held_images, held_clips = _distinct_images(data.eval_images), _distinct_clips(data.eval_audio)
    palette = tokenizers_stage.palette_baseline(data, held_images, held_clips, image, audio)
    text = TextTokenizer.from_config(settings.text, data.texts)
    print(f"held out: {len(held_images)} images/frames, {len(held_clips)} clips; palette {palette}")
    shown = torch.stack([s.pixels for s in held_images[:8]])
    palette_codec = ImagePalette.fit(
        torch.stack(distinct([s.pixels for s in data.train_images])),
        settings.image.downsample,
        settings.image.quantizer.codebook_size,
    )
    rows, runs = [shown, palette_codec.reconstruct(shown)], []
    for seconds in ([-1.0] if args.initialise_only else []) + args.seconds:
        image, audio, spent = warm_up(config, data, text, seconds)
        measured = {**evaluate_images(image, held_images), **evaluate_audio(audio, held_clips)}
        run = {"budget_seconds": seconds, **spent, "tokenizer": measured}
        print(json.dumps(run))
        runs.append(run)
        rows.append(reconstructions(image, shown))
    demo_budget = [r for r in runs if r["budget_seconds"] == settings.warmup.max_seconds]
    headline = (demo_budget or runs)[-1]  # the config's own budget when it was run
    out = {
        "config": args.config,
        "held_out": {"images": len(held_images), "clips": len(held_clips)},
        "palette": palette,
        "runs": runs,
        "headline_budget_seconds": headline["budget_seconds"],
        "results": entries(headline["tokenizer"], palette),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    GRID.write_bytes(image_grid(rows))
    plot_curve(runs, palette, CURVE)
    print(f"written: {RESULTS}, {GRID}, {CURVE}")
    print(json.dumps(out["results"], indent=2))


if __name__ == "__main__":
    main()
