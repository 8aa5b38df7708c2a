"""Response tokens/s of DFM decoding (no cache, adaptive cache) against AR with a KV cache.

One randomly initialised ``OmniModel`` (``--preset``, text vocabulary ``--text-vocab``)
serves all three decoders, so the backbone, heads and kernels are the same:

- ``ar``: :func:`training.autoregressive.ar_generate`, greedy with the KV cache (prefill
  of the instruction, then one ``ar_step`` per token). It decodes exactly ``length``
  tokens: with random weights ``<EOS>`` means nothing, and both sides must produce the same
  number of tokens.
- ``dfm_nocache``: confidence-ordered parallel unmasking (LLaDA) of a ``length``-position
  ``<MASK>`` canvas, ``--tokens-per-step`` committed per step, so ``length /
  tokens-per-step`` steps; every step runs instruction + canvas through the full DFM
  forward.
- ``dfm_cache``: the same, through the adaptive cache (instruction keys/values once;
  ``--refresh-ratio`` of the response recomputed per layer, full refresh every
  ``--full-refresh-every`` steps; dLLM-Cache).

The DFM canvas length is fixed to ``length`` (no dynamic-length probing), as AR's token
count is. Each call is the whole generation of a batch of ``--batch`` random instructions
of ``--prompt-length`` text ids, from ids in to ids out (instruction encoding included),
under ``torch.inference_mode``. Every (length, decoder) pair runs once untimed (warm-up),
then the decoders run alternately ``--repeats`` times (order rotated each repeat) and the
medians are compared. The headline is the adaptive-cache decoder against AR at the length
where that ratio is lowest.

    python benchmarks/generation_speed.py [--preset small] [--device cpu] [--lengths 64 256]
    python benchmarks/generation_speed.py --preset 1b5 --device cuda --dtype bfloat16 \\
        --out benchmarks/results/generation_speed_1b5_cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokenization.vocab import VocabLayout
from training.autoregressive import ar_generate
from training.dfm import MaskedPath, PolynomialScheduler
from training.generation import text_canvas
from training.model import OmniModel
from training.model_config import load_model_config
from training.model_predictor import ModelPredictor
from training.sampling import (
    CacheConfig,
    SamplerConfig,
    Vocabulary,
    confidence_unmask,
    prior_sample,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "generation_speed.json"
TARGET_RATIO = 2.0  # DFM (adaptive cache) response tokens/s against AR with the KV cache
MODES = ("dfm_nocache", "dfm_cache", "ar")
MEDIA_SIZE, MEDIA_DIM = 512, 64  # the tokenizers' default codebook (unused by text decoding)


def build_model(preset: str, device: str, dtype: str, text_vocab: int) -> OmniModel:
    """A random-weight model of ``preset`` on ``device`` in ``dtype``, in eval mode."""
    layout = VocabLayout(text_size=text_vocab, image_size=MEDIA_SIZE, audio_size=MEDIA_SIZE)
    gen = torch.Generator().manual_seed(0)
    codebooks = {m: torch.randn(MEDIA_SIZE, MEDIA_DIM, generator=gen) for m in ("image", "audio")}
    torch.manual_seed(0)
    config = load_model_config(preset, (f"dtype={dtype}",))
    return OmniModel(config, layout, codebooks).to(device).eval()


class DfmDecoder:
    """Confidence unmasking of a fixed ``length``-position canvas after ``instruction``;
    keeps the fraction of response positions x layers its last call recomputed."""

    def __init__(
        self, model: OmniModel, instruction: Tensor, length: int, sampler: SamplerConfig
    ) -> None:
        self.model, self.instruction, self.sampler = model, instruction, sampler
        self.vocab = Vocabulary(model.layout, model.groups)
        self.path = MaskedPath(PolynomialScheduler(1.0), model.groups, self.vocab.mask_id)
        self.lengths = torch.full((instruction.shape[0],), length, device=instruction.device)
        self.recomputed_fraction = 0.0

    def __call__(self) -> Tensor:
        predictor = ModelPredictor(self.model, self.instruction, cache=self.sampler.cache)
        canvas = prior_sample(self.path, text_canvas(self.lengths, self.vocab), self.vocab)
        out = confidence_unmask(predictor, canvas, self.vocab, self.sampler).ids
        self.recomputed_fraction = predictor.recomputed / predictor.full_equivalent
        return out


def decoders(
    model: OmniModel, instruction: Tensor, length: int, sampler: SamplerConfig
) -> dict[str, Callable[[], Any]]:
    """One zero-argument call per mode, each generating ``length`` tokens per row."""
    exact = sampler.model_copy(update={"cache": CacheConfig(enabled=False)})
    return {
        "dfm_nocache": DfmDecoder(model, instruction, length, exact),
        "dfm_cache": DfmDecoder(model, instruction, length, sampler),
        "ar": lambda: ar_generate(model, instruction, length),
    }


def timed(run: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call, the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="configs/model preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each decoder")
    parser.add_argument("--batch", type=int, default=1, help="instructions per call")
    parser.add_argument("--prompt-length", type=int, default=32, help="instruction tokens")
    parser.add_argument("--text-vocab", type=int, default=32_000, help="text BPE ids")
    parser.add_argument("--tokens-per-step", type=int, default=8, help="DFM: committed per step")
    parser.add_argument("--refresh-ratio", type=float, default=0.25, help="DFM cache")
    parser.add_argument("--full-refresh-every", type=int, default=8, help="DFM cache, steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    device = torch.device(args.device)
    sampler = SamplerConfig(
        tokens_per_step=args.tokens_per_step,
        temperature=0.0,
        cache=CacheConfig(
            refresh_ratio=args.refresh_ratio, full_refresh_every=args.full_refresh_every
        ),
    )
    model = build_model(args.preset, args.device, args.dtype, args.text_vocab)
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    instruction = torch.randint(0, args.text_vocab, (args.batch, args.prompt_length), generator=gen)
    instruction = instruction.to(device)
    print(f"{args.preset}: {params / 1e6:.1f}M parameters on {device} ({args.dtype}), "
          f"backend {model.backend}, {torch.get_num_threads()} threads")  # fmt: skip

    seconds: dict[int, dict[str, list[float]]] = {n: {m: [] for m in MODES} for n in args.lengths}
    recomputed: dict[int, float] = {}
    with torch.inference_mode():
        for length in args.lengths:
            calls = decoders(model, instruction, length, sampler)
            for mode in MODES:  # warm-up: kernels, allocator, rotary tables
                timed(calls[mode], device)
            for attempt in range(args.repeats):
                order = MODES[attempt % 3 :] + MODES[: attempt % 3]
                for mode in order:
                    seconds[length][mode].append(timed(calls[mode], device))
                timings = ", ".join(f"{m} {seconds[length][m][-1]:.2f}s" for m in MODES)
                print(f"  length {length} repeat {attempt}: {timings}", flush=True)
            recomputed[length] = calls["dfm_cache"].recomputed_fraction

    tokens = {n: args.batch * n for n in args.lengths}
    steps = {n: math.ceil(n / args.tokens_per_step) for n in args.lengths}
    rate = {
        n: {m: tokens[n] / statistics.median(seconds[n][m]) for m in MODES} for n in args.lengths
    }
    ratio = {
        n: {m: rate[n][m] / rate[n]["ar"] for m in ("dfm_nocache", "dfm_cache")}
        for n in args.lengths
    }
    headline = min(args.lengths, key=lambda n: ratio[n]["dfm_cache"])
    details = {
        str(n): {
            "steps": steps[n],
            "tokens": tokens[n],
            **{
                m: {
                    "tokens_per_s": round(rate[n][m], 2),
                    "median_seconds": round(statistics.median(seconds[n][m]), 3),
                    "seconds": [round(s, 3) for s in seconds[n][m]],
                }
                for m in MODES
            },
            "ratio_dfm_nocache_vs_ar": round(ratio[n]["dfm_nocache"], 3),
            "ratio_dfm_cache_vs_ar": round(ratio[n]["dfm_cache"], 3),
            "dfm_cache_recomputed_fraction": round(recomputed[n], 3),
            "dfm_nocache_seconds_per_step": round(
                statistics.median(seconds[n]["dfm_nocache"]) / steps[n], 4
            ),
            "dfm_cache_seconds_per_step": round(
                statistics.median(seconds[n]["dfm_cache"]) / steps[n], 4
            ),
            "ar_seconds_per_token": round(statistics.median(seconds[n]["ar"]) / n, 4),
        }
        for n in args.lengths
    }
    result = {
        "name": "generation_speed",
        "unit": "response tokens/s",
        "value": round(rate[headline]["dfm_cache"], 2),
        "baseline": round(rate[headline]["ar"], 2),
        "ratio": round(ratio[headline]["dfm_cache"], 3),
        "target": TARGET_RATIO,
        "headline": f"dfm_cache vs ar at length {headline} (the lowest ratio of the lengths)",
        "lengths": details,
        "settings": {
            "preset": args.preset,
            "parameters": params,
            "device": str(device),
            "dtype": args.dtype,
            "attention_backend": model.backend,
            "batch": args.batch,
            "prompt_length": args.prompt_length,
            "text_vocab": args.text_vocab,
            "dfm_decoding": "confidence unmasking (LLaDA low-confidence remasking), argmax",
            "tokens_per_step": args.tokens_per_step,
            "refresh_ratio": args.refresh_ratio,
            "full_refresh_every": args.full_refresh_every,
            "ar_decoding": "greedy, KV cache, exactly `length` tokens (no EOS stop)",
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores"
            + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'length':>6s} {'mode':12s} {'tokens/s':>9s} {'seconds':>8s} {'vs AR':>6s}")
    for n in args.lengths:
        for m in MODES:
            versus = f"{ratio[n][m]:6.2f}" if m in ratio[n] else f"{'':6s}"
            print(f"{n:6d} {m:12s} {rate[n][m]:9.1f} {statistics.median(seconds[n][m]):8.2f} "
                  f"{versus}")  # fmt: skip
    print(
        f"DFM (adaptive cache) vs AR: {result['ratio']:.2f}x at length {headline} "
        f"(target >= {TARGET_RATIO}x); written to {args.out}"
    )


if __name__ == "__main__":
    main()
