"""Supervised tokens/s and padding with one-bucket micro-batches vs randomly mixed ones.

NExT-OMNI trains one modality per micro-batch (similar lengths, little padding) and reports
1.4x training efficiency over mixing modalities; the target here is at least that.

Both sides train the same sequences, the same number of them, in micro-batches of the same
size, on two copies of the same randomly initialised ``OmniModel`` (``--size``, seed 0):

- ``one_bucket``: the first ``--micro-batches`` micro-batches of ``training.batch_source.
  BatchSource`` with the trainer's settings (rank 0 of 1; DGS padding to the block), the
  bucket of each chosen by the trainer's schedule (smooth weighted round-robin) with
  ``--weights equal`` (the trainer's default, ``train.bucket_weights: {}``: a strict
  rotation over the buckets) or ``proportional`` (weights = the buckets' train samples);
- ``mixed``: the same sequences (the same ``TokenSample`` objects) in a seeded random order
  (``--seed``), cut into micro-batches of the same size and collated by the same
  ``training.micro_batch.collate``, so a micro-batch draws sequences across buckets.

The sample corpus is small (364 train samples, five of them per video bucket), so a bucket's
stream wraps around and sequences recur; the result says how many sequences are distinct.
Replication changes neither side's lengths mix, only how often a sample is seen.

Each side runs a bare loop on CPU (``--cpus`` torch threads, no Ray): per micro-batch
``Objective.prepare`` (DFM corruption, seeded per micro-batch), forward, the summed loss
terms over their tokens, backward; ``torch.optim.AdamW`` (the trainer's groups and
settings) every ``--grad-accum`` micro-batches. The two sides alternate optimizer step by
optimizer step (the order swapped every step) so both see the same machine load; each runs
one untimed warm-up step first (on its own first micro-batches).

Supervised tokens are the response positions the DFM objective trains (real positions after
the instruction, DGS ``<PAD>`` included): the same total on both sides, so the tokens/s
ratio is the inverse ratio of the times. The positions scored in one step (the corrupted
subset, ``train/supervised_tokens_per_s`` in the trainer) are drawn at random per
micro-batch and are reported too. The padding fraction is the share of the (B, L) grids
that is batch padding. A padding-only projection (no model) gives both weightings'
padding and grid sizes over ``--projection-micro-batches`` micro-batches.

    python benchmarks/modality_batching.py [--size small] [--micro-batches 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from training_setup import (
    RESULTS,
    adamw,
    batch_source,
    build_objective,
    machine,
    pipeline_config,
    prepare_workspace,
    set_environment,
    train_inputs,
)

from tokenization.token_samples import TokenSample, read_token_samples
from tokenization.vocab import VocabLayout
from training.micro_batch import MicroBatch, collate

TARGET_RATIO = 1.4  # one-bucket supervised tokens/s over mixed
SIDES = ("one_bucket", "mixed")


def bucket_weights(inputs: Any, mode: str) -> tuple[dict[str, float], dict[str, int]]:
    """The schedule's weights (equal or proportional to train samples) and the sizes."""
    sizes = {
        bucket: sum(1 for s in read_token_samples(shards) if s.meta["split"] == "train")
        for bucket, shards in inputs.shards.items()
    }
    if mode == "equal":
        return dict.fromkeys(sizes, 1.0), sizes
    return {b: float(n) for b, n in sizes.items() if n > 0}, sizes


def train_samples(inputs: Any) -> dict[tuple[str, str], TokenSample]:
    """Every train sample by (bucket, key)."""
    return {
        (bucket, s.key): s
        for bucket, shards in inputs.shards.items()
        for s in read_token_samples(shards)
        if s.meta["split"] == "train"
    }


def build_batches(
    config: Any, inputs: Any, weights: dict[str, float], count: int, seed: int
) -> tuple[dict[str, list[MicroBatch]], list[TokenSample]]:
    """``count`` one-bucket micro-batches from ``BatchSource`` and the same sequences mixed."""
    source = batch_source(config, inputs, weights)
    try:
        one_bucket = [next(source) for _ in range(count)]
    finally:
        source.close()
    by_key = train_samples(inputs)
    sequences = [by_key[(b.bucket, key)] for b in one_bucket for key in b.keys]
    train = config.train
    pad_id = VocabLayout(**inputs.layout).special_id("<PAD>")
    order = np.random.default_rng(seed).permutation(len(sequences))
    size = train.micro_batch_size
    mixed = [
        collate([sequences[i] for i in order[start : start + size]], "mixed", pad_id,
                train.dgs_block)
        for start in range(0, len(order), size)
    ]  # fmt: skip
    for a, b in zip(one_bucket, mixed, strict=True):  # same rows, DGS padding included
        assert a.ids.shape[0] == b.ids.shape[0]
    assert sum(b.real_tokens for b in one_bucket) == sum(b.real_tokens for b in mixed)
    return {"one_bucket": one_bucket, "mixed": mixed}, sequences


def response_tokens(batch: MicroBatch) -> int:
    return int(batch.response_mask.sum())


class Side:
    """One side's model, optimizer and batches; runs and times one optimizer step at a time."""

    def __init__(self, config: Any, inputs: Any, batches: list[MicroBatch], seed: int) -> None:
        self.objective = build_objective(config, inputs)  # same seed: same initial weights
        self.model = self.objective.model
        self.optimizer = adamw(self.model, config.train)
        self.batches, self.seed, self.grad_accum = batches, seed, config.train.grad_accum
        self.grad_clip = config.train.grad_clip
        self.seconds, self.scored = 0.0, 0
        self.step_seconds: list[float] = []

    def steps(self) -> int:
        return -(-len(self.batches) // self.grad_accum)

    def run_step(self, index: int, batches: list[MicroBatch] | None = None) -> float:
        """Forward + backward of the step's micro-batches, clipping, AdamW; seconds."""
        window = batches or self.batches[index * self.grad_accum : (index + 1) * self.grad_accum]
        started = time.perf_counter()
        prepared = []
        for m, batch in enumerate(window):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index * 64 + m)
            prepared.append(self.objective.prepare(batch, generator))
        totals: Counter[str] = Counter()
        for item in prepared:
            totals.update(item.counts)
        for item in prepared:
            hidden = self.model(
                item.inputs,
                attention_mask=item.batch.attention_mask,
                instruction_lengths=item.batch.instruction_lengths,
            )
            terms = self.objective.term_sums(hidden, item.inputs, item.targets, item.scored, item.t)
            if terms:
                sum(value / totals[t] for t, value in terms.items()).backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        if batches is None:
            self.seconds += seconds
            self.scored += int(totals["ce"])
            self.step_seconds.append(seconds)
        return seconds


def padding_stats(batches: list[MicroBatch]) -> dict[str, Any]:
    real = sum(b.real_tokens for b in batches)
    grid = sum(b.ids.numel() for b in batches)
    return {
        "padding_fraction": round(1.0 - real / grid, 4),
        "grid_tokens": grid,
        "real_tokens": real,
        "response_tokens": sum(response_tokens(b) for b in batches),
        "max_length": max(b.ids.shape[1] for b in batches),
    }


def projection(config: Any, inputs: Any, count: int, seed: int) -> dict[str, Any]:
    """Padding of both weightings over ``count`` micro-batches, without a model."""
    out = {}
    for mode in ("equal", "proportional"):
        weights, _ = bucket_weights(inputs, mode)
        batches, _ = build_batches(config, inputs, weights, count, seed)
        one, mixed = padding_stats(batches["one_bucket"]), padding_stats(batches["mixed"])
        out[mode] = {
            "micro_batches": count,
            "padding_one_bucket": one["padding_fraction"],
            "padding_mixed": mixed["padding_fraction"],
            "grid_ratio_mixed_over_one_bucket": round(mixed["grid_tokens"] / one["grid_tokens"], 3),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workspace", type=Path, help="copy tokens/ and tokenizers/ from it")
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=16, help="per side (timed)")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--weights", default="equal", choices=["equal", "proportional"])
    parser.add_argument("--seed", type=int, default=0, help="order of the mixed side")
    parser.add_argument("--cpus", type=int, default=2, help="torch threads")
    parser.add_argument("--projection-micro-batches", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "modality_batching.json")
    args = parser.parse_args()
    if args.micro_batches % args.grad_accum:
        parser.error("--micro-batches must be a multiple of --grad-accum")

    set_environment()
    torch.set_num_threads(args.cpus)
    load_before = machine()
    workdir = Path(tempfile.mkdtemp(prefix="modality-batching-"))
    try:
        workspace = prepare_workspace(args.workspace, workdir / "ws")
        config = pipeline_config(
            workspace,
            [
                f"model.size={args.size}",
                f"train.micro_batch_size={args.micro_batch_size}",
                f"train.grad_accum={args.grad_accum}",
            ],
        )
        inputs = train_inputs(config)
        weights, sizes = bucket_weights(inputs, args.weights)
        batches, sequences = build_batches(config, inputs, weights, args.micro_batches, args.seed)
        projected = projection(config, inputs, args.projection_micro_batches, args.seed)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    sides = {name: Side(config, inputs, batches[name], args.seed) for name in SIDES}
    for name in SIDES:  # warm-up: allocator, kernels, AdamW state; not timed
        sides[name].run_step(0, batches[name][: args.grad_accum])
    steps = sides["one_bucket"].steps()
    for index in range(steps):
        order = SIDES if index % 2 == 0 else SIDES[::-1]
        timings = {name: sides[name].run_step(index) for name in order}
        print(
            f"step {index + 1}/{steps}: "
            + ", ".join(f"{n} {timings[n]:.2f} s" for n in SIDES)
            + f" (load {machine()['load_average'][0]})",
            flush=True,
        )

    stats = {name: padding_stats(batches[name]) for name in SIDES}
    supervised = stats["one_bucket"]["response_tokens"]
    rate = {name: supervised / sides[name].seconds for name in SIDES}
    scored_rate = {name: sides[name].scored / sides[name].seconds for name in SIDES}
    ratio = rate["one_bucket"] / rate["mixed"]
    distinct = len({(s.meta["bucket"], s.key) for s in sequences})
    result = {
        "name": "modality_batching",
        "unit": "supervised (response) tokens/s",
        "value": round(rate["one_bucket"], 2),
        "baseline": round(rate["mixed"], 2),
        "ratio": round(ratio, 3),
        "target": TARGET_RATIO,
        "headline": "one-bucket micro-batches (BatchSource) vs randomly mixed, same sequences",
        "padding_fraction": {n: stats[n]["padding_fraction"] for n in SIDES},
        "seconds": {n: round(sides[n].seconds, 3) for n in SIDES},
        "step_seconds_median": {
            n: round(statistics.median(sides[n].step_seconds), 3) for n in SIDES
        },
        "scored_tokens_per_s": {n: round(scored_rate[n], 2) for n in SIDES},
        "scored_tokens_ratio": round(scored_rate["one_bucket"] / scored_rate["mixed"], 3),
        "grids": stats,
        "padding_projection": projected,
        "settings": {
            "model": args.size,
            "parameters": sum(p.numel() for p in sides["mixed"].model.parameters()),
            "micro_batch_size": args.micro_batch_size,
            "micro_batches_per_side": args.micro_batches,
            "sequences_per_side": len(sequences),
            "distinct_sequences": distinct,
            "replicated": f"{len(sequences) - distinct} of {len(sequences)} sequences repeat a "
            "sample (bucket streams wrap around the small sample corpus)",
            "grad_accum": args.grad_accum,
            "optimizer_steps_per_side": steps,
            "schedule_weights": args.weights,
            "bucket_train_samples": sizes,
            "one_bucket_micro_batches_per_bucket": dict(
                sorted(Counter(b.bucket for b in batches["one_bucket"]).items())
            ),
            "mixed_seed": args.seed,
            "torch_threads": torch.get_num_threads(),
            "dgs_block": config.train.dgs_block,
            "workspace": str(args.workspace) if args.workspace else "built from examples/corpus",
        },
        "load_before": load_before,
        "load_after": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"one-bucket {rate['one_bucket']:.1f} supervised tokens/s (padding "
        f"{stats['one_bucket']['padding_fraction']:.1%}), mixed {rate['mixed']:.1f} "
        f"(padding {stats['mixed']['padding_fraction']:.1%}): ratio {ratio:.2f}x "
        f"(target >= {TARGET_RATIO}x); written to {args.out}"
    )


if __name__ == "__main__":
    main()
