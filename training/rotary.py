"""Rotary position embeddings (RoPE) exactly as transformers' Qwen2 computes them.

``cos, sin`` of ``position * inv_freq`` (each frequency twice, ``cat(freqs, freqs)``) times
the rope type's attention scaling; a vector is rotated as ``x * cos + rotate_half(x) * sin``
(Su et al., RoFormer, arXiv 2104.09864). The table is computed once per device in float32
and grown by doubling, so no forward recomputes it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (..., L, D) by the angles whose cos/sin broadcast to it."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class RotaryTable:
    """cos/sin per position. Not a module: its float32 table stays out of the state dict and
    out of ``model.to(bfloat16)``, whose cast of ``inv_freq`` would move every position."""

    def __init__(self, inv_freq: Tensor, scaling: float) -> None:
        self.inv_freq = inv_freq.detach().float().clone()
        self.scaling = scaling
        self.cos: Tensor | None = None
        self.sin: Tensor | None = None

    def table(self, length: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin of positions [0, length) as ``(length, D)`` in ``dtype``."""
        if self.cos is None or self.cos.shape[0] < length or self.cos.device != device:
            size = max(length, 2 * (0 if self.cos is None else self.cos.shape[0]))
            # Ordinary tensors even under inference_mode: training reuses the table.
            with torch.inference_mode(False):
                positions = torch.arange(size, device=device, dtype=torch.float32)
                freqs = positions[:, None] * self.inv_freq.to(device)[None, :]
                angles = torch.cat((freqs, freqs), dim=-1)
                self.cos = angles.cos() * self.scaling
                self.sin = angles.sin() * self.scaling
        return self.cos[:length].to(dtype), self.sin[:length].to(dtype)

    def at(self, positions: Tensor, upto: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin at per-row ``positions`` Long[B, n] (all < ``upto``) as ``(B, 1, n, D)``."""
        cos, sin = self.table(upto, dtype, positions.device)
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
