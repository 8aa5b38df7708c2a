"""How far the block sampler's cache drifts from exact decoding on long canvases, by refresh.

``benchmarks/sampler_quality.py`` judges the sampler's shortcuts by the evaluation metrics,
but on the demo's canvases (at most 64 positions, one block boundary), where a stale cache
has no room to drift. This measures the drift where it can: on a trained checkpoint, text
canvases of ``--lengths`` positions are decoded greedily by the default block sampler
(``evaluation.config.quick_sampler``: blocks of 32, every position above confidence 0.3
committed a step) three ways:

- ``exact``: the same blocks and commit rule with no cache (every step a full forward);
- the active cache with a full refresh every ``N`` steps, for each ``N`` of ``--refresh``
  (8, the default; at 4 a step that was once per block, as Fast-dLLM refreshes);
- ``never``: the active cache without periodic refresh.

Reported per (instructions, length, setting): token agreement with ``exact`` (share of
positions with the same id; greedy, so any difference is the cache's), the same over the
positions where ``exact`` did not put ``<PAD>`` (``content_agreement``), tokens/s, the
denoising steps taken and the fraction of the full per-step work recomputed. Two sets of
``--batch`` instructions, each followed by an all-``<MASK>`` canvas:

- ``real``: the first ones of the checkpoint's understanding buckets (train split). A model
  trained on short responses fills most of a long canvas with ``<PAD>``, which every
  setting agrees on: read ``content_agreement``.
- ``random``: uniform text ids (32): a stress test, out of distribution, on which the model
  does not settle into ``<PAD>`` and decodes content over the whole canvas.

Beside them, ``ar_tokens_per_s``: greedy KV-cached AR decoding of exactly ``length``
tokens after the same instructions on the same weights (the checkpoint was trained for DFM,
so its AR tokens mean nothing: the yardstick's speed only).

Headline: on ``random``, the default's content agreement at the longest length, against
``never``'s there (baseline) and the default's at the shortest length (64 positions, where
``sampler_quality`` found its metrics within the reference's spread: the target).

    python benchmarks/cache_fidelity.py --config configs/sample.yaml --run RUN_ID \\
        [--lengths 64 256 1024] [--refresh 8 16 32]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evaluation.anytoany import pad_rows
from evaluation.config import quick_sampler
from evaluation.tasks.base import split_sample
from pipelines.config import load_pipeline_config
from pipelines.eval.session import Session
from training.autoregressive import ar_generate
from training.dfm import ProbPath
from training.generation import text_canvas
from training.model import OmniModel
from training.model_predictor import ModelPredictor
from training.sampling import (
    SamplerConfig,
    Vocabulary,
    confidence_unmask,
    prior_sample,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "cache_fidelity.json"
NEVER = 1 << 30  # a full-refresh period no generation reaches


RANDOM_INSTRUCTION = 32  # tokens of a random instruction


def decode(
    model: OmniModel,
    path: ProbPath,
    instruction: tuple[Tensor, Tensor | None],
    length: int,
    sampler: SamplerConfig,
) -> tuple[Tensor, float, float, int]:
    """(ids Long[B, length], seconds, recomputed fraction, steps) of one greedy decoding."""
    vocab = Vocabulary(model.layout, model.groups)
    ids, mask = instruction
    predictor = ModelPredictor(model, ids, mask, cache=sampler.cache)
    lengths = torch.full((ids.shape[0],), length)
    canvas = prior_sample(path, text_canvas(lengths, vocab), vocab)
    started = time.perf_counter()
    out = confidence_unmask(predictor, canvas, vocab, sampler).ids
    seconds = time.perf_counter() - started
    return out, seconds, predictor.recomputed / predictor.full_equivalent, predictor.calls


def ar_seconds(model: OmniModel, instruction: tuple[Tensor, Tensor | None], length: int) -> float:
    """Seconds of greedy KV-cached AR decoding of exactly ``length`` tokens per row."""
    ids, mask = instruction
    started = time.perf_counter()
    ar_generate(model, ids, length, instruction_mask=mask)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/sample.yaml")
    parser.add_argument("--run", required=True, help="MLflow id of an omni train run (DFM)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--refresh", type=int, nargs="+", default=[8, 16, 32],
                        help="full-refresh periods (steps) to compare")  # fmt: skip
    parser.add_argument("--batch", type=int, default=8, help="instructions (rows)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    config = load_pipeline_config(args.config, args.overrides)
    suite = config.eval.suite("default").model_copy(
        update={"split": "train", "samples": args.batch, "tasks": ["understanding"]}
    )
    session = Session(config)
    loaded = session.load(args.run, args.step, suite)
    if loaded.path is None:
        raise SystemExit(f"run {args.run} is an AR run: nothing to compare")
    layout = loaded.model.layout
    samples = [s for rows in session.samples("fidelity", suite).values() for s in rows]
    rows = [split_sample(s)[0] for s in samples[: args.batch]]
    generator = torch.Generator().manual_seed(0)
    instructions = {
        "real": pad_rows(rows, layout.special_id("<PAD>")),
        "random": (
            torch.randint(
                0, layout.text_size, (args.batch, RANDOM_INSTRUCTION), generator=generator
            ),
            None,
        ),
    }
    pad = layout.special_id("<PAD>")
    default = quick_sampler()
    settings: dict[str, SamplerConfig] = {"exact": _with(default, enabled=False)}
    for period in sorted({*args.refresh, default.cache.full_refresh_every}):
        settings[f"refresh{period}"] = _with(default, full_refresh_every=period)
    settings["never"] = _with(default, full_refresh_every=NEVER)
    default_name = f"refresh{default.cache.full_refresh_every}"
    print(f"run {args.run} step {loaded.step}: {len(rows)} instructions, default {default_name}")

    tables: dict[str, dict[str, dict[str, Any]]] = {}
    ar: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for source, instruction in instructions.items():
            table = tables.setdefault(source, {})
            for length in args.lengths:
                seconds = ar_seconds(loaded.model, instruction, length)
                rate = ar.setdefault(source, {})[f"length{length}"] = round(
                    instruction[0].shape[0] * length / seconds, 1
                )
                print(f"{source:>6s} length {length:5d}         ar: {rate:8.1f} tokens/s")
                exact = None
                for name, sampler in settings.items():
                    ids, seconds, fraction, steps = decode(
                        loaded.model, loaded.path, instruction, length, sampler
                    )
                    exact = ids if exact is None else exact
                    row = table.setdefault(f"length{length}", {})
                    row[name] = {
                        **agreements(ids, exact, pad),
                        "tokens_per_s": round(ids.numel() / seconds, 1),
                        "steps": steps,
                        "recomputed_fraction": round(fraction, 3),
                    }
                    print(f"{source:>6s} length {length:5d} {name:>10s}: agreement "
                          f"{row[name]['agreement']:.3f} (content "
                          f"{row[name]['content_agreement']:.3f} of "
                          f"{row[name]['content_fraction']:.2f}), "
                          f"{row[name]['tokens_per_s']:8.1f} tokens/s, {steps} steps, "
                          f"recomputed {fraction:.3f}", flush=True)  # fmt: skip

    result = {
        "name": "cache_fidelity",
        **headline(tables, default_name, args.lengths),
        "default": default_name,
        "run": args.run,
        "step": loaded.step,
        "instructions": len(rows),
        "sampler": default.model_dump(),
        "tables": tables,
        "ar_tokens_per_s": ar,
        "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"default ({default_name}) content agreement at length {max(args.lengths)}, random "
        f"instructions: {result['value']} (never: {result['baseline']}; target, the default's "
        f"at {min(args.lengths)}: {result['target']}); written: {args.out}"
    )


def agreements(ids: Tensor, exact: Tensor, pad: int) -> dict[str, float]:
    """Share of positions where ``ids`` equals ``exact``: over all, and over the content
    (where ``exact`` is not ``pad``); the content's share of the canvas."""
    same, content = ids == exact, exact != pad
    return {
        "agreement": round(float(same.float().mean()), 4),
        "content_agreement": round(
            float(same[content].float().mean()) if content.any() else 1.0, 4
        ),
        "content_fraction": round(float(content.float().mean()), 3),
    }


def headline(
    tables: dict[str, dict[str, dict[str, Any]]], default: str, lengths: list[int]
) -> dict[str, Any]:
    """The JSON's value / baseline / ratio / target: content agreement on ``random``."""
    table = tables["random"]
    shortest, longest = f"length{min(lengths)}", f"length{max(lengths)}"
    value = table[longest][default]["content_agreement"]
    baseline = table[longest]["never"]["content_agreement"]
    return {
        "unit": "content agreement with exact decoding (default sampler, random "
        "instructions, longest canvas)",
        "value": value,
        "baseline": baseline,
        "ratio": round(value / max(baseline, 1e-9), 3),
        "target": table[shortest][default]["content_agreement"],
        "target_meaning": f"the default's content agreement at {shortest}, where "
        "sampler_quality found its metrics within the reference's spread",
    }


def _with(sampler: SamplerConfig, **cache: Any) -> SamplerConfig:
    """``sampler`` with its cache settings updated by ``cache``."""
    return sampler.model_copy(update={"cache": sampler.cache.model_copy(update=cache)})


if __name__ == "__main__":
    main()
