"""Who attends to whom, and which kernel computes it (SDPA or flash-attn 2).

The model's masks all belong to one small family, described structurally by
:class:`AttentionMask` rather than as a dense tensor, so each backend can realise it its
own way:

    allowed[b, i, j] = key_valid[b, j]
                       and (not causal or j <= i + (Lk - Lq))            (bottom-right causal)
                       and (prefix is None or j < n[b] or i >= n[b])     (instruction prefix)

* SDPA gets ``is_causal=True`` or no mask at all where that is exact, else one boolean
  ``(B, 1, Lq, Lk)`` mask (never an additive float one).
* flash-attn 2 has no arbitrary masks. It gets ``flash_attn_varlen_func`` over the packed
  real tokens (``cu_seqlens``), and the instruction prefix as two calls: instruction
  queries over instruction keys, response queries over every key. The one member of the
  family it cannot express exactly (causal + padded keys + fewer queries than keys) goes
  to SDPA. Outputs at padding query positions are unspecified under either backend.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["sdpa", "flash_attention_2"]
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


@functools.cache
def flash_attn_installed() -> bool:
    """Whether the ``flash_attn`` package can be imported (it needs a CUDA build of torch)."""
    return importlib.util.find_spec("flash_attn") is not None


def check_right_padded(attention_mask: torch.Tensor) -> None:
    """Positions are 0..n-1 per row, so padding must follow every real token of its row."""
    if bool((attention_mask[:, 1:] & ~attention_mask[:, :-1]).any()):
        raise ValueError("attention_mask must be right padding (True = real token, then False)")
    empty = (~attention_mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no real token")


def resolve_backend(
    requested: Literal["auto", "sdpa", "flash_attention_2"],
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    flash_available: bool | None = None,
) -> Backend:
    """The kernel for weights on ``device`` in ``dtype``.

    "auto" takes flash-attn 2 only when it is installed, the weights are on CUDA in
    bf16/fp16 and the head fits the kernel; "flash_attention_2" demands exactly that and
    raises a ValueError saying what is missing otherwise.
    """
    if requested == "sdpa":
        return "sdpa"
    available = flash_attn_installed() if flash_available is None else flash_available
    missing = [
        reason
        for reason, ok in (
            ("the flash_attn package is not installed", available),
            (f"the weights are on {device.type}, not cuda", device.type == "cuda"),
            (f"dtype {dtype} is not bfloat16/float16", dtype in FLASH_DTYPES),
            (f"head_dim {head_dim} exceeds {FLASH_MAX_HEAD_DIM}", head_dim <= FLASH_MAX_HEAD_DIM),
        )
        if not ok
    ]
    if not missing:
        return "flash_attention_2"
    if requested == "flash_attention_2":
        raise ValueError("attention=flash_attention_2 is unusable: " + "; ".join(missing))
    return "sdpa"


@dataclass(frozen=True)
class AttentionMask:
    """Structured attention mask (see the module docstring for its meaning).

    key_valid: Bool[B, Lk] (True = real key) or None when every key is real.
    causal: bottom-right aligned causal mask (queries are the last Lq of the keys).
    prefix_lengths: Long[B] instruction lengths n; needs Lq == Lk and causal False.
    """

    key_valid: torch.Tensor | None = None
    causal: bool = False
    prefix_lengths: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.causal and self.prefix_lengths is not None:
            raise ValueError("an instruction prefix mask cannot also be causal")

    def dense(
        self, q_len: int, k_len: int, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask broadcastable to (B, 1, Lq, Lk) or None, is_causal) for SDPA."""
        causal = self.causal and q_len > 1  # one query at the end sees every key
        if self.key_valid is None and self.prefix_lengths is None:
            if not causal:
                return None, False
            if q_len == k_len:
                return None, True
        allowed = None
        if self.key_valid is not None:
            allowed = self.key_valid[:, None, None, :]
        if causal:
            rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
            tri = torch.arange(k_len, device=device)[None, :] <= rows
            allowed = tri if allowed is None else allowed & tri
        if self.prefix_lengths is not None:
            n = self.prefix_lengths[:, None, None, None]
            key_in_prefix = torch.arange(k_len, device=device) < n  # (B, 1, 1, Lk)
            query_after = torch.arange(q_len, device=device)[:, None] >= n  # (B, 1, Lq, 1)
            structure = key_in_prefix | query_after
            allowed = structure if allowed is None else allowed & structure
        return allowed, False

    def flash_expressible(self, q_len: int, k_len: int) -> bool:
        """Whether :func:`flash_attention` computes exactly this mask (on real queries)."""
        if self.prefix_lengths is not None:
            return q_len == k_len
        return not (self.causal and q_len > 1 and self.key_valid is not None and q_len != k_len)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float
) -> torch.Tensor:
    """(B, Hq, Lq, D), (B, Hkv, Lk, D) x2 -> (B, Hq, Lq, D) with torch SDPA (GQA native)."""
    dense, is_causal = mask.dense(q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=dense,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def _varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_sel: torch.Tensor,
    k_sel: torch.Tensor,
    causal: bool,
    scale: float,
    out: torch.Tensor,
) -> None:
    """One ``flash_attn_varlen_func`` call over the selected queries/keys of every row.

    q: (B, Lq, Hq, D); k, v: (B, Lk, Hkv, D); q_sel: Bool[B, Lq]; k_sel: Bool[B, Lk];
    writes the outputs into ``out`` (B, Lq, Hq, D) at ``q_sel``.
    """
    q_counts, k_counts = q_sel.sum(1), k_sel.sum(1)
    if not bool(q_counts.any()):
        return
    kernel = importlib.import_module("flash_attn").flash_attn_varlen_func
    cu_q = F.pad(q_counts.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(k_counts.cumsum(0), (1, 0)).to(torch.int32)
    packed = kernel(
        q[q_sel],
        k[k_sel],
        v[k_sel],
        cu_q,
        cu_k,
        int(q_counts.max()),
        int(k_counts.max()),
        softmax_scale=scale,
        causal=causal,
    )
    out[q_sel] = packed.to(out.dtype)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float
) -> torch.Tensor:
    """Same contract as :func:`sdpa_attention`, through flash-attn 2 varlen calls.

    Only for masks with ``mask.flash_expressible``; padding queries come back as zeros.
    """
    batch, _, q_len, _ = q.shape
    k_len = k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = qt.new_zeros(qt.shape)
    every_key = (
        mask.key_valid
        if mask.key_valid is not None
        else torch.ones(batch, k_len, dtype=torch.bool, device=q.device)
    )
    every_query = torch.ones(batch, q_len, dtype=torch.bool, device=q.device)
    if mask.prefix_lengths is not None:
        n = mask.prefix_lengths[:, None]
        in_prefix = torch.arange(q_len, device=q.device)[None, :] < n
        _varlen(qt, kt, vt, in_prefix, in_prefix & every_key, False, scale, out)
        _varlen(qt, kt, vt, ~in_prefix, every_key, False, scale, out)
    elif mask.causal and q_len == k_len:
        # Packing keeps the order, so j <= i among the real tokens is the kernel's causal.
        _varlen(qt, kt, vt, every_key, every_key, True, scale, out)
    else:
        _varlen(qt, kt, vt, every_query, every_key, mask.causal and q_len > 1, scale, out)
    return out.transpose(1, 2)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    scale: float,
    backend: Backend,
) -> torch.Tensor:
    """Attention with ``backend``, falling back to SDPA where flash cannot express ``mask``."""
    if backend == "flash_attention_2" and mask.flash_expressible(q.shape[2], k.shape[2]):
        return flash_attention(q, k, v, mask, scale)
    return sdpa_attention(q, k, v, mask, scale)
