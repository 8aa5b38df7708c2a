"""Greedy AR decoding whose step keeps one shape for the whole generation, so it compiles.

:func:`training.autoregressive.ar_generate` attends at each step over the filled part of
its KV cache (``keys[:, :, :end]``), a shape that grows by one a token: eager PyTorch does
not mind, but a compiled step would be traced again at every length, and a CUDA graph
needs fixed shapes and fixed addresses. Here the cache is allocated once at its final
capacity (a static KV cache, as transformers' ``StaticCache`` and gpt-fast do), each step
writes its key/value at a slot given as a tensor (``index_copy_``) and attends over the
whole capacity with the slots not yet written masked out, and the position, the slot and
the token are tensors: every step runs the same graph on the same buffers.

``compile=True`` runs that step through ``torch.compile(fullgraph=True, dynamic=False)``:
on CUDA with ``mode="reduce-overhead"``, which captures the step in a CUDA graph and
replays it (one launch a token instead of a few hundred: AR at batch 1 on a GPU is
launch-bound otherwise), the KV buffers marked static so that the graph writes them in
place; on the CPU inductor's C++ kernels. Measured on this project's 2-core CPU
(``benchmarks/generation_speed.py``): compiling pays where a step's fixed costs dominate
(``tiny``) and loses to the eager step with oneDNN-packed weights on ``small``, whose
products inductor hands to MKL; the benchmark's AR yardstick is the faster of the two.

Tokens are those of ``ar_generate`` (same model, same argmax); the attention sums run over
a longer, masked key axis, so logits may differ in the last bits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from training.attention import AttentionMask
from training.autoregressive import greedy_tokens
from training.model import OmniModel

Step = Callable[
    [Tensor, Tensor, Tensor, list[Tensor], list[Tensor], Tensor, Tensor, Tensor], Tensor
]


class StaticArDecoder:
    """Greedy KV-cached decoding of one head group with a fixed-shape step.

    One decoder serves many calls; with ``compile`` the step is compiled at the first call
    of each (batch, capacity) shape and reused after. ``group``: the head whose argmax is
    each token (unified ids out).
    """

    def __init__(self, model: OmniModel, group: str = "text", compile: bool = False) -> None:
        model.head(group)  # fails fast on an unknown group
        self.model, self.group, self.compile = model, group, compile
        self.start = model.groups.start[group]
        self._step: Step = self._forward_step
        if compile:
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            self._step = torch.compile(self._forward_step, fullgraph=True, dynamic=False, mode=mode)

    @torch.inference_mode()
    def __call__(
        self,
        instruction: Tensor,
        max_new_tokens: int,
        eos_id: int | None = None,
        instruction_mask: Tensor | None = None,
        capacity: int | None = None,
    ) -> Tensor:
        """Long[B, P] instruction -> Long[B, n] new ids, as ``ar_generate`` returns them.

        ``capacity`` (at least ``P + max_new_tokens``) sizes the cache, and so the compiled
        step: a warm-up of a few tokens at the timed run's capacity compiles what the timed
        run uses.
        """
        model = self.model
        needed = instruction.shape[1] + max_new_tokens
        if capacity is not None and capacity < needed:
            raise ValueError(f"capacity {capacity} < instruction + new tokens ({needed})")
        kv = model.ar_prefill(instruction, instruction_mask, capacity=capacity or needed)
        size = kv.capacity
        device = instruction.device
        valid = kv.key_valid
        if valid is None:
            valid = torch.ones(instruction.shape[0], size, dtype=torch.bool, device=device)
        for buffer in (*kv.keys, *kv.values):
            # Slots not yet written hold whatever the allocator left, NaN included: masked
            # scores weigh them by 0, and 0 * NaN would still reach the output.
            buffer[:, :, kv.length :].zero_()
            if self.compile and device.type == "cuda":
                torch._dynamo.mark_static_address(buffer)
        cos, sin = model.rotary.table(size, model.config.torch_dtype, device)
        slot = torch.tensor([kv.length], device=device)
        positions = kv.positions.clone()

        def advance(token: Tensor) -> Tensor:
            if self.compile and device.type == "cuda":  # a new step of the CUDA graph trees
                torch.compiler.cudagraph_mark_step_begin()
            # A copy: under CUDA graphs the returned tensor is overwritten by the next replay.
            token = self._step(token, slot, positions, kv.keys, kv.values, valid, cos, sin).clone()
            slot.add_(1)
            positions.add_(1)
            return token

        first = model.head_logits(kv.last_hidden, self.group).argmax(-1) + self.start
        return greedy_tokens(first, advance, max_new_tokens, eos_id)

    def _forward_step(
        self,
        token: Tensor,
        slot: Tensor,
        positions: Tensor,
        keys: list[Tensor],
        values: list[Tensor],
        valid: Tensor,
        cos: Tensor,
        sin: Tensor,
    ) -> Tensor:
        """Long[B] tokens at cache slot ``slot`` (Long[1]) and rotary ``positions`` (Long[B])
        -> Long[B] next tokens; writes their keys/values into ``keys``/``values``
        (``(B, Hkv, C, D)`` each). ``valid``: Bool[B, C] real prompt slots; ``cos``/``sin``:
        the ``(C, D)`` rotary tables."""
        model = self.model
        x = model.embed(token[:, None])
        cos, sin = cos[positions][:, None, None, :], sin[positions][:, None, None, :]
        slots = torch.arange(valid.shape[1], device=valid.device)
        mask = AttentionMask(valid & (slots <= slot))
        for layer, layer_keys, layer_values in zip(model.layers, keys, values, strict=True):
            q, k, v = model._qkv(layer, x, cos, sin)
            layer_keys.index_copy_(2, slot, k)
            layer_values.index_copy_(2, slot, v)
            x = model._finish(layer, x, q, layer_keys, layer_values, mask, few=True,
                              backend="sdpa")  # fmt: skip
        hidden = model.backbone.norm(x)[:, -1]
        return model.head_logits(hidden, self.group).argmax(-1) + self.start
