"""Held-out loss of a model on token samples, with corruption fixed by a seed.

The same samples, times and masks for every model compared (a checkpoint against the
initial weights, two checkpoints of one run), so the difference is the model's alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenization.token_samples import TokenSample
from training.micro_batch import collate
from training.objective import Objective


@torch.no_grad()
def held_out_loss(
    objective: Objective,
    samples: Sequence[TokenSample],
    seed: int = 0,
    batch_size: int = 8,
    dgs_block: int | None = 32,
) -> float:
    """Mean ``ce`` per scored token over ``samples`` (grouped by bucket, in order)."""
    model = objective.model
    pad_id = model.layout.special_id("<PAD>")
    block = dgs_block if objective.kind == "dfm" else None
    by_bucket: dict[str, list[TokenSample]] = {}
    for sample in samples:
        by_bucket.setdefault(sample.meta["bucket"], []).append(sample)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            for start in range(0, len(group), batch_size):
                batch = collate(group[start : start + batch_size], bucket, pad_id, block)
                prepared = objective.prepare(batch.to(model.device), generator)
                if prepared.counts["ce"] == 0:
                    continue
                terms, _, _ = objective(
                    prepared.inputs, prepared.batch.attention_mask,
                    prepared.batch.instruction_lengths, prepared.targets, prepared.scored,
                    prepared.t,
                )  # fmt: skip
                total += float(terms["ce"])
                count += prepared.counts["ce"]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no scored token in the held-out samples")
    return total / count
