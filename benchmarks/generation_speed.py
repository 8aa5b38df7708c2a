"""Response tokens/s of DFM decoding (no cache, adaptive cache) against AR with a KV cache.

One randomly initialised ``OmniModel`` (``--preset``, text vocabulary ``--text-vocab``)
serves all three decoders, so the backbone, heads and kernels are the same:

- ``ar``: :func:`training.autoregressive.ar_generate`, greedy with the KV cache (prefill
  of the instruction, then one ``ar_step`` per token). It decodes exactly ``length``
  tokens: with random weights ``<EOS>`` means nothing, and both sides must produce the same
  number of tokens.
- ``ar_compiled``: the same tokens through :class:`training.static_ar.StaticArDecoder`
  with ``compile=True``: a static KV cache and one fixed-shape step, compiled once per
  shape (on CUDA captured in a CUDA graph, ``mode="reduce-overhead"``); its warm-up runs at
  the timed run's cache capacity, so compiling is never timed. The AR **yardstick** every
  ratio is taken against is the faster of ``ar`` and ``ar_compiled`` at each setting
  (``ar_yardstick`` in the JSON; ``--no-compile`` leaves the compiled modes out).
- ``dfm_nocache``: confidence-ordered parallel unmasking (LLaDA) of a ``length``-position
  ``<MASK>`` canvas, ``--tokens-per-step`` committed per step, so ``length /
  tokens-per-step`` steps; every step runs instruction + canvas through the full DFM
  forward.
- ``dfm_cache``: the same, through the adaptive cache (instruction keys/values once;
  ``--refresh-ratio`` of the response recomputed per layer, full refresh every
  ``--full-refresh-every`` steps; dLLM-Cache).
- ``dfm_block``: semi-autoregressive blocks of ``--decode-block`` positions unmasked left to
  right, ``--tokens-per-step`` per step, with the active cache (``CacheConfig.strategy =
  "active"``: each step recomputes only the current block's masked positions and the tokens
  just committed; the rest of the canvas, future ``<MASK>`` positions included, keeps its
  cached keys/values; full refresh every ``--block-refresh-every`` steps; Fast-dLLM).
- ``dfm_block_norefresh``: the same without the periodic full refresh (``full_refresh_every``
  beyond the step count): cheaper on long canvases, less faithful to exact decoding
  (``benchmarks/cache_fidelity.py`` measures by how much).
- ``dfm_block_compiled``: ``dfm_block`` with ``CacheConfig.compile``: each partial step's
  pass compiled (a CUDA graph on CUDA), its position count padded to a power of two; the
  full refreshes stay eager. Its warm-up decodes the timed canvas (the shapes it compiles
  depend on the canvas length), so compiling is never timed.

``dfm_block`` decodes in the blocks and with the cache of the evaluation suites' and
``omni generate``'s default sampler (:func:`evaluation.config.quick_sampler`), at a fixed
budget of ``--tokens-per-step`` (default 4, full refresh every 8 steps): the default commits
every position above confidence 0.3 instead, a count that random weights cannot show (they
are never confident: one token a step). ``benchmarks/sampler_quality.py`` measures the
threshold's speed and quality on trained checkpoints (there it committed about 2.6 tokens
a step on image canvases); 4 a step, the default before, cost audio quality on two of the
three checkpoints it was measured on.

Bounds, measured in the same run: the read bandwidth (a full read of 1 GiB) and the
matrix-product rate (:func:`matmul_peak`: the backbone's own widest product at 512 rows).
AR's roofline is the lower of its bandwidth bound (weights + KV cache bytes per step) and
its matrix products at the peak rate. A DFM mode's compute bound is the tokens/s its
counted matrix-product FLOPs (:func:`dfm_flops`) allow at the peak rate: a block step
recomputes about 22 positions for 4 tokens, so once a step has more rows than the
machine needs to saturate its arithmetic (a handful on a CPU), the sampler's FLOPs per
token, not the kernels, cap its speed. ``ratio_bound_*_vs_ar`` is that cap against the
measured AR, ``..._vs_ar_roofline`` against AR at its roofline: where either is below the
2x target, no kernel work reaches it with that sampler.

The DFM canvas length is fixed to ``length`` (no dynamic-length probing), as AR's token
count is. Each call is the whole generation of a batch of ``--batch`` random instructions
of ``--prompt-length`` text ids, from ids in to ids out (instruction encoding included),
under ``torch.inference_mode``, for each of ``--batches``. Every (batch, length, decoder)
runs once untimed on a canvas of at most 64 tokens (warm-up), then the decoders run
alternately ``--repeats`` times (order rotated each repeat) and the medians are compared;
``dfm_nocache`` and ``dfm_cache`` only up to ``--slow-max-length``. The headline is
``dfm_block`` against AR at the setting where that ratio is lowest.

    python benchmarks/generation_speed.py [--preset small] [--device cpu] [--lengths 64 256]
    python benchmarks/generation_speed.py --preset 1b5 --device cuda --dtype bfloat16 \\
        --out benchmarks/results/generation_speed_1b5_cuda.json
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
from typing import Any

import torch
from torch import Tensor

from tokenization.vocab import VocabLayout
from training.autoregressive import ar_generate
from training.config import CacheConfig
from training.dfm import MaskedPath, PolynomialScheduler
from training.generation import text_canvas
from training.model import OmniModel
from training.model_config import load_model_config
from training.model_predictor import ModelPredictor
from training.sampling import (
    SamplerConfig,
    Vocabulary,
    confidence_unmask,
    prior_sample,
)
from training.static_ar import StaticArDecoder

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "generation_speed.json"
TARGET_RATIO = 2.0  # DFM (adaptive cache) response tokens/s against AR with the KV cache
MODES = (
    "dfm_nocache",
    "dfm_cache",
    "dfm_block",
    "dfm_block_norefresh",
    "dfm_block_compiled",
    "ar",
    "ar_compiled",
)
COMPILED = ("dfm_block_compiled", "ar_compiled")  # left out by --no-compile
AR_MODES = ("ar", "ar_compiled")  # the yardstick is the faster of these
NEVER = 1 << 30  # a full-refresh period no generation reaches
WARMUP_LENGTH = 64  # warm-up calls decode this many tokens at most
SLOW = ("dfm_nocache", "dfm_cache")  # skipped above --slow-max-length
MEDIA_SIZE, MEDIA_DIM = 512, 64  # the tokenizers' default codebook (unused by text decoding)


def build_model(
    preset: str, device: str, dtype: str, text_vocab: int, cpu_linear: str = "onednn"
) -> OmniModel:
    """A random-weight model of ``preset`` on ``device`` in ``dtype``, in eval mode."""
    layout = VocabLayout(text_size=text_vocab, image_size=MEDIA_SIZE, audio_size=MEDIA_SIZE)
    gen = torch.Generator().manual_seed(0)
    codebooks = {m: torch.randn(MEDIA_SIZE, MEDIA_DIM, generator=gen) for m in ("image", "audio")}
    torch.manual_seed(0)
    config = load_model_config(preset, (f"dtype={dtype}", f"cpu_linear={cpu_linear}"))
    return OmniModel(config, layout, codebooks).to(device).eval()


class DfmDecoder:
    """Confidence unmasking of a fixed ``length``-position canvas after ``instruction``;
    keeps the fraction of response positions x layers its last call recomputed and the
    matrix-product FLOPs it ran (:func:`dfm_flops`)."""

    def __init__(
        self, model: OmniModel, instruction: Tensor, length: int, sampler: SamplerConfig
    ) -> None:
        self.model, self.instruction, self.sampler = model, instruction, sampler
        self.vocab = Vocabulary(model.layout, model.groups)
        self.path = MaskedPath(PolynomialScheduler(1.0), model.groups, self.vocab.mask_id)
        self.lengths = torch.full((instruction.shape[0],), length, device=instruction.device)
        self.recomputed_fraction = 0.0
        self.flops = 0.0

    def __call__(self) -> Tensor:
        predictor = ModelPredictor(self.model, self.instruction, cache=self.sampler.cache)
        canvas = prior_sample(self.path, text_canvas(self.lengths, self.vocab), self.vocab)
        out = confidence_unmask(predictor, canvas, self.vocab, self.sampler).ids
        self.recomputed_fraction = predictor.recomputed / predictor.full_equivalent
        self.flops = dfm_flops(self.model, predictor, self.instruction.numel())
        return out


def linear_flops_per_position(model: OmniModel) -> int:
    """FLOPs (2 per multiply-add) of one position through one layer's linear maps (q, k, v,
    o, gate, up, down): what a recomputed position costs at least, attention aside."""
    layer = model.layers[0]
    return 2 * sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))


def dfm_flops(model: OmniModel, predictor: ModelPredictor, prompt_positions: int) -> float:
    """Matrix-product FLOPs of one DFM generation: every (layer, position) the predictor
    computed, the instruction's (once with a cache, at every call without), and the heads'
    rows. Attention scores and the small element-wise operations are left out, so these
    FLOPs at the peak rate are a lower bound on the time."""
    layers = model.config.backbone.num_hidden_layers
    passes = predictor.calls if not predictor.cache.enabled else 1
    positions = predictor.recomputed + layers * prompt_positions * passes
    flops = positions * linear_flops_per_position(model)
    hidden = model.config.backbone.hidden_size
    for name, rows in predictor.head_rows.items():
        flops += 2 * rows * hidden * model.groups.size[name]
    return float(flops)


def decoders(
    model: OmniModel,
    instruction: Tensor,
    length: int,
    sampler: SamplerConfig,
    block: SamplerConfig,
    modes: tuple[str, ...],
    compiled_ar: StaticArDecoder | None = None,
    capacity: int | None = None,
) -> dict[str, Callable[[], Any]]:
    """One zero-argument call per mode in ``modes``, each generating ``length`` tokens per row.

    ``compiled_ar`` serves ``ar_compiled`` with a KV cache of ``capacity`` positions (the
    timed run's, also for a shorter warm-up, so that it compiles the shape that is timed).
    """
    exact = sampler.model_copy(update={"cache": CacheConfig(enabled=False)})
    stale = block.model_copy(
        update={"cache": block.cache.model_copy(update={"full_refresh_every": NEVER})}
    )
    compiled = block.model_copy(update={"cache": block.cache.model_copy(update={"compile": True})})
    calls: dict[str, Callable[[], Any]] = {
        "dfm_nocache": DfmDecoder(model, instruction, length, exact),
        "dfm_cache": DfmDecoder(model, instruction, length, sampler),
        "dfm_block": DfmDecoder(model, instruction, length, block),
        "dfm_block_norefresh": DfmDecoder(model, instruction, length, stale),
        "dfm_block_compiled": DfmDecoder(model, instruction, length, compiled),
        "ar": lambda: ar_generate(model, instruction, length),
    }
    if compiled_ar is not None:
        calls["ar_compiled"] = lambda: compiled_ar(instruction, length, capacity=capacity)
    return {mode: calls[mode] for mode in modes}


def memory_bandwidth(device: torch.device, mib: int = 1024, repeats: int = 5) -> float:
    """Bytes/s that a full read of a ``mib`` MiB tensor reaches on ``device`` (best of
    ``repeats``): the roofline of a memory-bound decoding step."""
    data = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    best = min(timed(data.sum, device) for _ in range(repeats))
    return data.numel() * data.element_size() / best


def matmul_peak(model: OmniModel, device: torch.device, rows: int = 512, repeats: int = 5) -> float:
    """FLOP/s of the backbone's widest product (layer 0's gate and up, run as the decoders
    run it) at ``rows`` rows, best of ``repeats``: the compute roofline of a step that
    recomputes many positions."""
    mlp = model.layers[0].mlp
    pair = (mlp.gate_proj, mlp.up_proj)
    x = torch.randn(rows, mlp.gate_proj.in_features, device=device).to(model.config.torch_dtype)
    model.linears(pair, x)  # packs the weights, warms the kernel
    best = min(timed(lambda: model.linears(pair, x), device) for _ in range(repeats))
    return 2 * rows * sum(layer.weight.numel() for layer in pair) / best


def ar_flops_per_token(model: OmniModel) -> int:
    """Matrix-product FLOPs of one AR token: one position through every layer, and the LM
    head."""
    layers = model.config.backbone.num_hidden_layers
    return layers * linear_flops_per_position(model) + 2 * model.lm_head.weight.numel()


def ar_bytes_per_step(model: OmniModel, batch: int, keys: int) -> int:
    """Bytes one AR step must read at least: every weight the step multiplies by (the
    backbone's layers and the LM head; the embedding table is only indexed, the media
    projections and heads are idle) and each row's cached keys and values over ``keys``
    positions."""
    weights = sum(p.numel() * p.element_size() for p in model.layers.parameters())
    weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    backbone = model.config.backbone
    per_key = (
        2 * backbone.num_key_value_heads * model.head_dim * model.lm_head.weight.element_size()
    )
    return weights + batch * keys * per_key * backbone.num_hidden_layers


def timed(run: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call, the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def timing(tokens: int, seconds: list[float]) -> dict[str, Any]:
    """tokens/s at the median of ``seconds``, the median, and every run's seconds."""
    median = statistics.median(seconds)
    return {
        "tokens_per_s": round(tokens / median, 2),
        "median_seconds": round(median, 3),
        "seconds": [round(x, 3) for x in seconds],
    }


def measure(
    model: OmniModel,
    instruction: Tensor,
    length: int,
    sampler: SamplerConfig,
    block: SamplerConfig,
    modes: tuple[str, ...],
    repeats: int,
    device: torch.device,
    bandwidth: float | None = None,
    peak: float | None = None,
    compiled_ar: StaticArDecoder | None = None,
) -> dict[str, Any]:
    """Warm-up then ``repeats`` interleaved timed calls of each mode (order rotated).

    Every ratio is against the AR yardstick, the faster of the AR modes measured.

    With ``bandwidth`` (bytes/s), AR's bandwidth bound; with ``peak`` (FLOP/s) too, AR's
    roofline (the lower of that and its matrix products at the peak rate) and each DFM
    mode's compute bound: the tokens/s its matrix products allow at the peak rate, against
    the measured AR (``ratio_bound_*_vs_ar``) and against AR at its roofline
    (``..._vs_ar_roofline``). No kernel lifts a ratio above its bound without changing
    what the sampler computes."""
    capacity = instruction.shape[1] + length
    calls = decoders(model, instruction, length, sampler, block, modes, compiled_ar, capacity)
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    # Warm-up (kernels, allocator, rotary tables, packed weights) on a canvas of at most
    # WARMUP_LENGTH: what it settles does not depend on the length, and at 1024 tokens a
    # full-length warm-up would double minutes-long runs. The compiled modes are the
    # exception: they compile per shape, so ar_compiled warms up at the timed cache capacity
    # and dfm_block_compiled on the timed canvas itself.
    warm = decoders(
        model, instruction, min(length, WARMUP_LENGTH), sampler, block, modes, compiled_ar,
        capacity,
    )  # fmt: skip
    for mode in modes:
        timed(calls[mode] if mode == "dfm_block_compiled" else warm[mode], device)
    for attempt in range(repeats):
        shift = attempt % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            seconds[mode].append(timed(calls[mode], device))
        timings = ", ".join(f"{m} {seconds[m][-1]:.2f}s" for m in modes)
        print(f"  batch {instruction.shape[0]} length {length} repeat {attempt}: {timings}",
              flush=True)  # fmt: skip
    tokens = instruction.shape[0] * length
    median = {m: statistics.median(seconds[m]) for m in modes}
    yardstick = min((m for m in AR_MODES if m in modes), key=median.__getitem__)
    ar = tokens / median[yardstick]
    out: dict[str, Any] = {"tokens": tokens, "ar_yardstick": yardstick}
    for mode in AR_MODES:
        if mode in modes:
            out[mode] = timing(tokens, seconds[mode])
    if "ar_compiled" in modes:
        out["ratio_ar_compiled_vs_ar"] = round(median["ar"] / median["ar_compiled"], 3)
    out["ar_seconds_per_token"] = round(median[yardstick] / length, 4)
    roofline = None
    if bandwidth:
        # AR is memory-bound at small batches: a step can go no faster than its bytes
        # (weights + KV cache at the mean context) read at the measured bandwidth, nor,
        # at larger batches, than its matrix products at the peak rate.
        step_bytes = ar_bytes_per_step(
            model, instruction.shape[0], instruction.shape[1] + length // 2
        )
        bound = instruction.shape[0] * bandwidth / step_bytes
        out["ar_bandwidth_bound_tokens_per_s"] = round(bound, 2)
        out["ar_fraction_of_bandwidth_bound"] = round(ar / bound, 3)
        roofline = bound
        if peak:
            roofline = min(bound, peak / ar_flops_per_token(model))
            out["ar_roofline_tokens_per_s"] = round(roofline, 2)
    for mode in modes:
        if mode in AR_MODES:
            continue
        out[mode] = timing(tokens, seconds[mode])
        out[f"ratio_{mode}_vs_ar"] = round(median[yardstick] / median[mode], 3)
        out[f"{mode}_recomputed_fraction"] = round(calls[mode].recomputed_fraction, 3)
        if peak:
            flops = calls[mode].flops
            bound = tokens * peak / flops
            out[f"{mode}_gflop"] = round(flops / 1e9, 2)
            out[f"{mode}_compute_bound_tokens_per_s"] = round(bound, 2)
            out[f"{mode}_fraction_of_compute_bound"] = round(tokens / median[mode] / bound, 3)
            out[f"ratio_bound_{mode}_vs_ar"] = round(bound / ar, 3)
            if roofline:
                out[f"ratio_bound_{mode}_vs_ar_roofline"] = round(bound / roofline, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="configs/model preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--cpu-linear", default="onednn", choices=["onednn", "aten"],
        help="linear layers on the CPU: oneDNN with packed weights, or F.linear (MKL)",
    )  # fmt: skip
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="rows per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each decoder")
    parser.add_argument("--prompt-length", type=int, default=32, help="instruction tokens")
    parser.add_argument("--text-vocab", type=int, default=32_000, help="text BPE ids")
    parser.add_argument("--tokens-per-step", type=int, default=4, help="DFM: committed per step")
    parser.add_argument("--refresh-ratio", type=float, default=0.25, help="DFM cache")
    parser.add_argument("--full-refresh-every", type=int, default=8, help="DFM cache, steps")
    parser.add_argument("--decode-block", type=int, default=32, help="dfm_block: block size")
    parser.add_argument(
        "--block-refresh-every", type=int, default=8, help="dfm_block: full refresh, steps"
    )
    parser.add_argument(
        "--slow-max-length", type=int, default=1024,
        help="run dfm_nocache and dfm_cache only up to this length (they are slow on CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--no-compile", action="store_true",
        help="leave ar_compiled and dfm_block_compiled out (compiling takes 10-60 s per "
        "shape on a CPU)",
    )  # fmt: skip
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
    block = SamplerConfig(
        tokens_per_step=args.tokens_per_step,
        temperature=0.0,
        decode_block=args.decode_block,
        cache=CacheConfig(strategy="active", full_refresh_every=args.block_refresh_every),
    )
    model = build_model(args.preset, args.device, args.dtype, args.text_vocab, args.cpu_linear)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {params / 1e6:.1f}M parameters on {device} ({args.dtype}), "
          f"backend {model.backend}, {torch.get_num_threads()} threads")  # fmt: skip

    with torch.inference_mode():
        bandwidth = memory_bandwidth(device)
        peak = matmul_peak(model, device)
    print(f"memory bandwidth (read): {bandwidth / 1e9:.1f} GB/s; "
          f"matrix products: {peak / 1e9:.1f} GFLOP/s")  # fmt: skip
    compiled_ar = None if args.no_compile else StaticArDecoder(model, compile=True)
    results: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for batch in args.batches:
            gen = torch.Generator().manual_seed(1)
            instruction = torch.randint(
                0, args.text_vocab, (batch, args.prompt_length), generator=gen
            ).to(device)
            for length in args.lengths:
                modes = tuple(
                    m for m in MODES
                    if (m not in SLOW or length <= args.slow_max_length)
                    and (m not in COMPILED or not args.no_compile)
                )  # fmt: skip
                results[f"batch{batch}_length{length}"] = measure(
                    model, instruction, length, sampler, block, modes, args.repeats, device,
                    bandwidth, peak, compiled_ar,
                )  # fmt: skip

    headline = min(results, key=lambda key: results[key]["ratio_dfm_block_vs_ar"])
    best = results[headline]
    result = {
        "name": "generation_speed",
        "unit": "response tokens/s",
        "value": best["dfm_block"]["tokens_per_s"],
        "baseline": best[best["ar_yardstick"]]["tokens_per_s"],
        "ratio": best["ratio_dfm_block_vs_ar"],
        "target": TARGET_RATIO,
        "ratio_bound_vs_ar": best.get("ratio_bound_dfm_block_vs_ar"),
        "ratio_bound_vs_ar_roofline": best.get("ratio_bound_dfm_block_vs_ar_roofline"),
        "headline": f"dfm_block vs ar at {headline} (the lowest ratio of the settings)",
        "results": results,
        "settings": {
            "preset": args.preset,
            "parameters": params,
            "device": str(device),
            "dtype": args.dtype,
            "attention_backend": model.backend,
            "batches": args.batches,
            "lengths": args.lengths,
            "prompt_length": args.prompt_length,
            "text_vocab": args.text_vocab,
            "dfm_decoding": "confidence unmasking (LLaDA low-confidence remasking), argmax",
            "tokens_per_step": args.tokens_per_step,
            "dfm_cache": f"adaptive (value cosine), refresh_ratio {args.refresh_ratio}, "
            f"full refresh every {args.full_refresh_every} steps",
            "dfm_block": f"semi-AR blocks of {args.decode_block}, active cache (current block "
            f"+ just-committed positions recomputed), full refresh every "
            f"{args.block_refresh_every} steps",
            "dfm_block_norefresh": "dfm_block without the periodic full refresh",
            "dfm_block_compiled": "dfm_block with its partial steps compiled (CacheConfig."
            "compile; positions padded to a power of two)",
            "cpu_linear": model.config.cpu_linear,
            "memory_bandwidth_gb_s": round(bandwidth / 1e9, 2),
            "matmul_peak_gflop_s": round(peak / 1e9, 1),
            "slow_max_length": args.slow_max_length,
            "ar_decoding": "greedy, KV cache, exactly `length` tokens (no EOS stop); "
            "yardstick: the faster of eager (ar) and static cache + torch.compile (ar_compiled)",
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores"
            + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'setting':>20s} {'mode':24s} {'tokens/s':>9s} {'seconds':>8s} {'vs AR':>6s} "
          f"{'bound':>6s}")  # fmt: skip
    for key, row in results.items():
        for m in MODES:
            if m not in row:
                continue
            ratio, bound = row.get(f"ratio_{m}_vs_ar"), row.get(f"ratio_bound_{m}_vs_ar")
            versus = f"{ratio:6.2f}" if ratio is not None else f"{'':6s}"
            limit = f"{bound:6.2f}" if bound is not None else f"{'':6s}"
            name = f"{m} (yardstick)" if m == row["ar_yardstick"] else m
            print(f"{key:>20s} {name:24s} {row[m]['tokens_per_s']:9.1f} "
                  f"{row[m]['median_seconds']:8.2f} {versus} {limit}")  # fmt: skip
    print(
        "vs AR: against the yardstick (ar_compiled: against ar); bound: the most a DFM mode "
        "could reach against the yardstick if its matrix products ran at the measured peak"
    )
    print(
        f"DFM (block + active cache) vs AR: {result['ratio']:.2f}x at {headline} "
        f"(target >= {TARGET_RATIO}x); written to {args.out}"
    )


if __name__ == "__main__":
    main()
