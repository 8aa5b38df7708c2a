"""One micro-batch: sequences of a single bucket, padded, with the stream position after it.

Every micro-batch comes from one bucket (NExT-OMNI trains one modality per micro-batch:
similar lengths, little padding). For DFM each response is first padded with ``<PAD>`` to
a multiple of the DGS block (``pad_response_to_block``), which is what the dynamic-length
sampler asks of the model at inference; then the batch is right-padded to its longest
sequence, the padding masked out of attention and of every loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tokenization.token_samples import TokenSample
from training.generation import pad_response_to_block


@dataclass
class MicroBatch:
    """``ids`` Long[B, L] clean unified ids; ``attention_mask`` Bool[B, L] (True = real);
    ``instruction_lengths`` Long[B]; ``stream_state``: the bucket stream's position after
    this batch (what a checkpoint taken after it must resume from)."""

    bucket: str
    ids: Tensor
    attention_mask: Tensor
    instruction_lengths: Tensor
    keys: list[str]
    stream_state: dict[str, int] = field(default_factory=dict)

    @property
    def response_mask(self) -> Tensor:
        """Bool[B, L]: real positions at or after each row's instruction."""
        positions = torch.arange(self.ids.shape[1], device=self.ids.device)
        return self.attention_mask & (positions[None, :] >= self.instruction_lengths[:, None])

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def padding_fraction(self) -> float:
        """Share of the (B, L) grid that is batch padding (DGS ``<PAD>`` counts as real)."""
        return 1.0 - self.real_tokens / max(1, self.ids.numel())

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(
            self.bucket,
            self.ids.to(device),
            self.attention_mask.to(device),
            self.instruction_lengths.to(device),
            self.keys,
            self.stream_state,
        )


def collate(
    samples: Sequence[TokenSample],
    bucket: str,
    pad_id: int,
    dgs_block: int | None,
    stream_state: Mapping[str, Any] | None = None,
) -> MicroBatch:
    """Right-pad ``samples`` (all of ``bucket``) into one micro-batch.

    ``dgs_block``: pad each response with ``<PAD>`` to a multiple of it first (DFM);
    None leaves responses as they are (the AR baseline stops at ``<EOS>``).
    """
    if not samples:
        raise ValueError(f"an empty micro-batch of bucket {bucket!r}")
    rows, lengths = [], []
    for sample in samples:
        tokens = sample.tokens.numpy()
        n = int(sample.meta["instruction_length"])
        if dgs_block is not None:
            tokens = pad_response_to_block(tokens, n, pad_id, dgs_block)
        rows.append(tokens)
        lengths.append(n)
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return MicroBatch(
        bucket=bucket,
        ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        instruction_lengths=torch.tensor(lengths, dtype=torch.long),
        keys=[s.key for s in samples],
        stream_state=dict(stream_state or {}),
    )
