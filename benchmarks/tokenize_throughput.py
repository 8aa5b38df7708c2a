"""Encode throughput of the media tokenizers, batched against one input at a time, same run.

Each modality is timed on what its tokenizer's ``encode`` takes, from the sample media in
``examples/corpus/media/``:

- images: ``ImageTokenizer.encode`` on preprocessed pixels (JPEG decoding and resizing are
  done before timing), ``--images`` images in batches of ``--batch`` against batches of 1;
- audio: ``AudioTokenizer.encode`` on the decoded clips (samples, rate), all clips in one
  call against one call per clip; the unit is seconds of audio per second;
- video: ``VideoTokenizer.encode`` on the encoded clips (frame decoding included), all
  clips in one call against one call per clip.

Tokenizers are freshly initialised (untrained): throughput does not depend on the weights.
Every measurement is warmed up once, then both sides run alternately ``--repeats`` times and
the medians are compared. The same code runs on CUDA when it is available.

    python benchmarks/tokenize_throughput.py [--threads N] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import soundfile
import torch

from tokenization.audio import AudioTokenizer, AudioTokenizerConfig
from tokenization.image import ImageTokenizer, ImageTokenizerConfig
from tokenization.video import VideoConfig, VideoTokenizer

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO / "examples" / "corpus" / "media"
RESULTS = REPO / "benchmarks" / "results"
TARGET_RATIO = 2.0


def timed(batched: Callable[[], object], single: Callable[[], object], repeats: int, device: str):
    """Median seconds of ``batched`` and of ``single`` (warmed up, run alternately)."""

    def once(work: Callable[[], object]) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            work()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    once(batched), once(single)
    runs: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        runs[0].append(once(batched))
        runs[1].append(once(single))
    return statistics.median(runs[0]), statistics.median(runs[1])


def entry(modality: str, unit: str, amount: float, seconds: tuple[float, float], **extra):
    value, baseline = amount / seconds[0], amount / seconds[1]
    return {
        "modality": modality,
        "unit": unit,
        "value": round(value, 2),
        "baseline": round(baseline, 2),
        "ratio": round(value / baseline, 3),
        "seconds": round(seconds[0], 4),
        "baseline_seconds": round(seconds[1], 4),
        **extra,
    }


def bench_images(device: str, count: int, batch: int, repeats: int) -> dict:
    tokenizer = ImageTokenizer.from_config(ImageTokenizerConfig()).to(device).eval()
    files = sorted((MEDIA / "images").glob("*.jpg"))
    images = [tokenizer.preprocess(files[i % len(files)].read_bytes()) for i in range(count)]
    pixels = torch.stack(images).to(device)  # (count, 3, R, R)

    def in_batches(size: int) -> None:
        for start in range(0, count, size):
            tokenizer.encode(pixels[start : start + size])

    seconds = timed(lambda: in_batches(batch), lambda: in_batches(1), repeats, device)
    return entry(
        "image",
        "images/s",
        count,
        seconds,
        images=count,
        batch=batch,
        resolution=int(pixels.shape[-1]),
        tokens_per_image=tokenizer.tokens_per_image,
    )


def bench_audio(device: str, repeats: int) -> dict:
    tokenizer = AudioTokenizer.from_config(AudioTokenizerConfig()).to(device).eval()
    # (samples (n,) or (n, channels), rate), as soundfile returns them
    clips = [
        soundfile.read(path, dtype="float32") for path in sorted((MEDIA / "audio").glob("*.wav"))
    ]
    audio_seconds = sum(len(samples) / rate for samples, rate in clips)
    seconds = timed(
        lambda: tokenizer.encode(clips),
        lambda: [tokenizer.encode([clip]) for clip in clips],
        repeats,
        device,
    )
    return entry(
        "audio",
        "audio-seconds/s",
        audio_seconds,
        seconds,
        clips=len(clips),
        audio_seconds=round(audio_seconds, 2),
    )


def bench_video(device: str, repeats: int) -> dict:
    image_tokenizer = ImageTokenizer.from_config(ImageTokenizerConfig()).to(device).eval()
    tokenizer = VideoTokenizer(image_tokenizer, VideoConfig())
    clips = [path.read_bytes() for path in sorted((MEDIA / "video").glob("*.mp4"))]
    seconds = timed(
        lambda: tokenizer.encode(clips),
        lambda: [tokenizer.encode([clip]) for clip in clips],
        repeats,
        device,
    )
    return entry(
        "video", "videos/s", len(clips), seconds, videos=len(clips), frames=tokenizer.frames
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side")
    parser.add_argument("--images", type=int, default=128, help="images encoded per run")
    parser.add_argument("--batch", type=int, default=32, help="batched side's image batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    entries = []
    for device in devices:
        entries += [
            bench_images(device, args.images, args.batch, args.repeats),
            bench_audio(device, args.repeats),
            bench_video(device, args.repeats),
        ]
        for item in entries[-3:]:
            item["device"] = device

    print(f"{'device':<6} {'modality':<8} {'unit':<16} {'batched':>10} {'one-by-one':>11} ratio")
    for item in entries:
        print(
            f"{item['device']:<6} {item['modality']:<8} {item['unit']:<16} "
            f"{item['value']:>10.2f} {item['baseline']:>11.2f} {item['ratio']:>5.2f}x"
        )

    headline = entries[0]  # images on CPU
    result = {
        "name": "tokenize_throughput",
        "unit": headline["unit"],
        "value": headline["value"],
        "baseline": headline["baseline"],
        "ratio": headline["ratio"],
        "target": TARGET_RATIO,
        "entries": entries,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "devices": devices,
        "baseline_description": "the same tokenizer encoding one input per call",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tokenize_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"images on CPU: batch {args.batch} {headline['ratio']:.2f}x one-by-one "
        f"(target >= {TARGET_RATIO}x)"
    )


if __name__ == "__main__":
    main()
