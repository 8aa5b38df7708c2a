"""Held-out loss while a run trains: the eval split of every bucket, scored every N steps.

A falling training loss can be memorisation; the loss on samples the run never trains on
(pretokenize's ``eval`` split, the same one ``omni eval`` reads) shows learning while the run
goes, in MLflow beside ``train/loss`` (``val/loss`` and ``val/loss_ce_<bucket>``).

Every rank reads the first ``samples`` eval samples of each bucket in file order and scores
every ``world``-th of them; the corruption of each batch is seeded by its position, so every
evaluation of a run sees the same masks and times and the curve moves only with the model.
Every rank runs the same number of forward passes whatever its share (a rank with fewer
samples repeats one with weight 0): under ZeRO-3 each forward gathers parameters
collectively, so ranks must agree on how many there are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tokenization.token_samples import TokenSample, read_token_samples
from training.micro_batch import collate
from training.objective import Objective

SPLIT = "eval"


def first_eval_samples(
    urls: Sequence[str],
    limit: int,
    max_length: int,
    storage_options: dict[str, Any] | None = None,
) -> list[TokenSample]:
    """Up to ``limit`` samples of the eval split from ``urls`` in file order, skipping any
    longer than ``max_length`` (training would skip them too)."""
    chosen: list[TokenSample] = []
    if limit <= 0 or not urls:
        return chosen
    for sample in read_token_samples(list(urls), storage_options):
        if sample.meta.get("split") == SPLIT and len(sample.tokens) <= max_length:
            chosen.append(sample)
            if len(chosen) == limit:
                break
    return chosen


class Validation:
    """The eval-split samples of one rank, and how to score them with the run's objective."""

    def __init__(
        self,
        samples: dict[str, list[TokenSample]],
        rank: int,
        world: int,
        batch_size: int,
        pad_id: int,
        dgs_block: int | None,
        seed: int,
    ) -> None:
        self.buckets = sorted(b for b, items in samples.items() if items)
        self.pad_id, self.dgs_block, self.seed = pad_id, dgs_block, seed
        self.batches: dict[str, list[tuple[list[TokenSample], bool]]] = {}
        for bucket in self.buckets:
            items = samples[bucket]
            mine = items[rank::world]
            per_rank = -(-len(items) // world)  # the largest share: every rank's batch count
            count = -(-per_rank // batch_size)
            chunks = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
            # A rank short of samples runs a zero-weight repeat, keeping collectives aligned.
            padded = [(chunk, True) for chunk in chunks]
            padded += [(items[:batch_size], False)] * (count - len(chunks))
            self.batches[bucket] = padded

    def __bool__(self) -> bool:
        return bool(self.buckets)

    @torch.no_grad()
    def sums(
        self, objective: Objective, forward: Callable[..., Any], device: torch.device
    ) -> list[float]:
        """``[ce sum, scored tokens]`` per bucket (in ``self.buckets`` order) over this rank's
        share; ``forward`` is the engine (or the objective) called like a training step."""
        out: list[float] = []
        for bucket_index, bucket in enumerate(self.buckets):
            total, count = 0.0, 0.0
            for batch_index, (chunk, counted) in enumerate(self.batches[bucket]):
                batch = collate(chunk, bucket, self.pad_id, self.dgs_block).to(device)
                generator = torch.Generator(device=device)
                generator.manual_seed(self.seed * 1_000_003 + bucket_index * 10_007 + batch_index)
                prepared = objective.prepare(batch, generator)
                terms, _, _ = forward(
                    prepared.inputs, batch.attention_mask, batch.instruction_lengths,
                    prepared.targets, prepared.scored, prepared.t,
                )  # fmt: skip
                if counted and "ce" in terms:
                    total += float(terms["ce"])
                    count += prepared.counts["ce"]
            out += [total, count]
        return out

    def metrics(self, reduced: Sequence[float]) -> dict[str, float]:
        """``val/loss`` (nats per scored token over every bucket) and ``val/loss_ce_<bucket>``
        from the sums of every rank (:meth:`sums`, all-reduced)."""
        metrics: dict[str, float] = {}
        total = count = 0.0
        for index, bucket in enumerate(self.buckets):
            s, n = reduced[2 * index], reduced[2 * index + 1]
            if n > 0:
                metrics[f"val/loss_ce_{bucket}"] = s / n
                total, count = total + s, count + n
        if count > 0:
            metrics["val/loss"] = total / count
        return metrics
