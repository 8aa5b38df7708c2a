"""An ``OmniModel`` behind the samplers' :class:`~training.sampling.Predictor` protocol.

One :class:`ModelPredictor` serves one batch of instructions through one generation. Two
modes (``CacheConfig.enabled``):

* no cache: every call runs the whole sequence, instruction + response canvas, through
  ``OmniModel.forward`` under the DFM mask (the instruction does not see the response).
* adaptive cache (dLLM-Cache, Liu et al., arXiv 2506.06295): the instruction's per-layer
  keys/values are computed once (``encode_instruction``; exact, since the instruction never
  attends to the response). The response is recomputed in full at the first call, whenever
  the canvas changes shape, and every ``full_refresh_every`` calls; in between,
  ``forward_response`` recomputes at each layer only the positions whose value vectors
  changed most since the cached step (lowest ``cos(v_new, v_cached)``: the
  ``refresh_ratio`` fraction, or all below ``refresh_threshold``) and reuses the cached
  layer outputs elsewhere. dLLM-Cache's observation: between adjacent denoising steps most
  response features barely move, and the value vector is a cheap, reliable proxy for which
  ones did. With ``strategy="active"`` the partial calls recompute instead exactly the
  positions asked for and those whose token changed (Fast-dLLM's dual cache; with block
  decoding, the current block).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from training.caches import InstructionCache, ResponseCache
from training.config import CacheConfig
from training.model import OmniModel


class ModelPredictor:
    """Logits of an ``OmniModel`` for response canvases following ``instruction``.

    instruction: Long[B, P] unified ids (right padding); instruction_mask: Bool[B, P]
    (True = real token) or None when no row is padded.
    """

    def __init__(
        self,
        model: OmniModel,
        instruction: Tensor,
        instruction_mask: Tensor | None = None,
        cache: CacheConfig | None = None,
    ) -> None:
        self.model = model
        self.cache = cache or CacheConfig()
        self.instruction = instruction
        self.instruction_mask = instruction_mask
        self.lengths = (
            instruction_mask.sum(1)
            if instruction_mask is not None
            else torch.full(
                (instruction.shape[0],), instruction.shape[1], device=instruction.device
            )
        )
        self._instruction_cache: InstructionCache | None = None
        self._response_cache: ResponseCache | None = None
        # The last cache with in-place buffers: compiled steps keep writing to those.
        self._buffers: ResponseCache | None = None
        self._calls_since_full = 0
        self._response: Tensor | None = None  # the canvas of the last cached call
        self._hidden: Tensor | None = None  # the last call's final hidden states
        self._logits: dict[str, Tensor] = {}  # Float[B, R, V_g]: head outputs kept per position
        self._known: dict[str, Tensor] = {}  # Bool[B, R]: where _logits matches _hidden
        # Response positions computed (summed over layers) and those a full pass computes.
        self.recomputed = 0
        self.full_equivalent = 0
        self.head_rows: dict[str, int] = {}  # positions each head group was run on
        self.calls = 0  # canvases passed through the model

    def __call__(self, response: Tensor, select: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Logits per head group at the selected positions (see ``Predictor``).

        With the adaptive cache, a position whose final hidden state was reused unchanged
        keeps the logits computed for it before (exactly the same numbers): the head, a
        ``V_g x H`` product per position, is only run where the hidden state is new. The
        active strategy recomputes every selected position, so nothing is kept: no
        ``(B, R, V_g)`` buffer, no comparison of the hidden states.
        """
        hidden = self.hidden(response, select)
        if not self.cache.enabled or self.cache.strategy == "active":
            return {name: self._run_head(hidden[where], name) for name, where in select.items()}
        changed = self._changed(hidden)
        return {name: self._head(hidden, name, where, changed) for name, where in select.items()}

    def _run_head(self, hidden: Tensor, name: str) -> Tensor:
        """Head ``name``'s logits of Float[N, H] hidden states, counted in ``head_rows``."""
        self.head_rows[name] = self.head_rows.get(name, 0) + hidden.shape[0]
        return self.model.head_logits(hidden, name)

    def _changed(self, hidden: Tensor) -> Tensor:
        """Bool[B, R]: positions whose final hidden state differs from the last call's."""
        previous, self._hidden = self._hidden, hidden
        if previous is None or previous.shape != hidden.shape:
            self._logits, self._known = {}, {}
            return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return (hidden != previous).any(-1)

    def _head(self, hidden: Tensor, name: str, where: Tensor, changed: Tensor) -> Tensor:
        """Logits of head ``name`` at ``where``, computed only where not known already."""
        if name not in self._logits:
            self._logits[name] = hidden.new_empty(*hidden.shape[:2], self.model.groups.size[name])
            self._known[name] = torch.zeros_like(changed)
        known = self._known[name] & ~changed
        needed = where & ~known
        if bool(needed.any()):
            self._logits[name][needed] = self._run_head(hidden[needed], name)
        self._known[name] = known | needed
        return self._logits[name][where]

    def hidden(self, response: Tensor, select: Mapping[str, Tensor] | None = None) -> Tensor:
        """Float[B, R, H] final hidden states of the response canvas Long[B, R].

        ``select``: the positions whose logits the caller wants; the ``active`` strategy
        recomputes those and the ones whose token changed (all positions when not given).
        """
        layers = self.model.config.backbone.num_hidden_layers
        self.calls += 1
        self.full_equivalent += layers * response.numel()
        if not self.cache.enabled:
            self.recomputed += layers * response.numel()
            return self._full_forward(response)
        if self._instruction_cache is None:
            self._instruction_cache = self.model.encode_instruction(
                self.instruction, self.instruction_mask
            )
        stale = self._response_cache
        if (
            stale is None
            or stale.outputs[0].shape[:2] != response.shape
            or self._calls_since_full + 1 >= self.cache.full_refresh_every
        ):
            stale, self._calls_since_full = None, 0
        else:
            self._calls_since_full += 1
        positions = None
        if stale is not None and self.cache.strategy == "active":
            positions = self._active_positions(response, select)
        hidden, self._response_cache = self.model.forward_response(
            response,
            self._instruction_cache,
            cache=stale,
            refresh_ratio=self.cache.refresh_ratio,
            refresh_threshold=self.cache.refresh_threshold,
            positions=positions,
            compiled=self.cache.compile,
            reuse=self._buffers if self.cache.compile else None,
        )
        if self._response_cache.joint_keys is not None:
            self._buffers = self._response_cache
        self._response = response
        self.recomputed += self._response_cache.recomputed
        return hidden

    def _active_positions(self, response: Tensor, select: Mapping[str, Tensor] | None) -> Tensor:
        """Long[B, n] sorted: per row the selected positions and those whose token changed
        since the last call, padded (every row computes ``n``, the largest count, rounded
        up to a power of two when compiled) with positions from the row's left end."""
        needed = response != self._response
        if select is None:
            needed = torch.ones_like(needed)
        else:
            for where in select.values():
                needed = needed | where
        count = max(1, int(needed.sum(1).max()))
        width = response.shape[1]
        if self.cache.compile:  # a few shapes to compile instead of one per count
            count = min(width, 1 << (count - 1).bit_length())
        # Needed positions first (score in [width, 2 width)), then the leftmost others.
        ranks = torch.arange(width, 0, -1, device=response.device)
        score = ranks + width * needed.long()
        return score.topk(count, dim=1).indices.sort(dim=1).values

    def _full_forward(self, response: Tensor) -> Tensor:
        """Instruction + response in one DFM forward; rows packed so that each response
        starts right after its row's real instruction tokens (padding after it)."""
        batch, width = response.shape
        steps = torch.arange(width, device=response.device)
        where = self.lengths[:, None] + steps[None, :]  # Long[B, R] response slots
        total = self.instruction.shape[1] + width
        ids = torch.cat([self.instruction, response], 1).scatter(1, where, response)
        valid = (
            torch.arange(total, device=response.device)[None, :] < (self.lengths + width)[:, None]
        )
        hidden = self.model.forward(
            ids,
            attention_mask=None if self.instruction_mask is None else valid,
            instruction_lengths=self.lengths,
        )
        return hidden.gather(1, where[:, :, None].expand(batch, width, hidden.shape[-1]))
