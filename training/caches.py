"""What :class:`~training.model.OmniModel` keeps between calls at inference.

Shapes: B rows, Hkv key/value heads, D head dim, H hidden size. Keys are stored after the
rotary embedding, so a cached key never needs its position again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class InstructionCache:
    """Per-layer keys/values of an instruction encoded on its own (:meth:`encode_instruction`).

    Under the DFM mask the instruction never sees the response, so these are exact for
    every denoising step. keys/values: one ``(B, Hkv, P, D)`` per layer; lengths: Long[B]
    real instruction tokens per row (right padding); key_valid: Bool[B, P] or None when
    no row is padded.
    """

    keys: list[Tensor]
    values: list[Tensor]
    lengths: Tensor
    key_valid: Tensor | None


@dataclass
class ResponseCache:
    """Per-layer response state of the previous denoising step (dLLM-Cache, arXiv 2506.06295).

    keys/values: one ``(B, Hkv, R, D)`` per layer; outputs: the layer outputs (residual
    stream after the layer), one ``(B, R, H)`` per layer. recomputed: (layer, row,
    position) triples the call that produced this cache actually computed; a full pass
    is ``layers * B * R``.
    """

    keys: list[Tensor]
    values: list[Tensor]
    outputs: list[Tensor]
    recomputed: int
    # Filled by the first partial pass at fixed positions: per layer the instruction's and
    # the response's keys/values in one contiguous (B, Hkv, P + R, D) buffer (``keys`` /
    # ``values`` then view its response part), and the final normed hidden states.
    joint_keys: list[Tensor] | None = None
    joint_values: list[Tensor] | None = None
    hidden: Tensor | None = None


@dataclass
class KVCache:
    """Causal (AR) key/value cache with room to append in place.

    keys/values: one ``(B, Hkv, capacity, D)`` per layer, the first ``length`` slots
    filled; key_valid: Bool[B, capacity] (False at prompt padding) or None; positions:
    Long[B] rotary position of each row's next token; last_hidden: ``(B, H)`` final hidden
    state of each row's last token (predicts the next one).
    """

    keys: list[Tensor]
    values: list[Tensor]
    length: int
    key_valid: Tensor | None
    positions: Tensor
    last_hidden: Tensor

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, needed: int) -> None:
        """Grow every buffer (doubling) so that ``needed`` slots fit; amortised O(1) append."""
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        if self.key_valid is not None:
            extra = self.key_valid.new_ones(self.key_valid.shape[0], capacity - self.capacity)
            self.key_valid = torch.cat([self.key_valid, extra], dim=1)
        self.keys = [_grow(k, capacity, 2) for k in self.keys]
        self.values = [_grow(v, capacity, 2) for v in self.values]


def _grow(buffer: Tensor, capacity: int, dim: int) -> Tensor:
    shape = list(buffer.shape)
    shape[dim] = capacity
    grown = buffer.new_empty(shape)
    grown.narrow(dim, 0, buffer.shape[dim]).copy_(buffer)
    return grown
