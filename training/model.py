"""OmniModel: one Qwen2-family transformer for discrete flow matching (DFM) and its AR baseline.

Inputs (NExT-OMNI): text and special ids use the LM's embedding table (``T + S`` rows; the
``<MASK>`` row is an ordinary, learned row of it); an image or audio id is looked up in
the tokenizer's *frozen* codebook and mapped to the hidden size by one light projection
per modality. Outputs: the LM head predicts the text group (text and special tokens), one
linear head per media block predicts its codebook ids. Heads run only on the positions a
caller selects (``head_logits``), never on the full vocabulary at every position.

Attention. The backbone's own modules are driven by a layer loop written here, so masks,
KV caches and partial recomputation are possible; with ``causal=True`` the loop equals
``transformers``' Qwen2 forward on the same weights. DFM mode is bidirectional with an
instruction prefix: query i sees key j iff j is real and (j < n or i >= n), n the
instruction length: the instruction is encoded without the noisy response (so its
keys/values are exact to cache), the response sees everything.

Reconstruction objective. The paper trains with
``L_overall = l1 L_ce + l2 L_rec^V + l3 L_rec^A`` (NExT-OMNI), where the reconstruction
terms compare decoded images / mel spectrograms with the input. Training here reads
pre-tokenised shards, so the pixel and mel decoders never run during DFM training; the
terms survive as regressions in codebook space: from the final hidden state at an image
(audio) position, ``reconstruct`` predicts a vector whose target is the frozen codebook
vector of the clean id there (``codebook_targets``). The pixel / mel decoders see nothing
but those vectors, so a hidden state that recovers them carries what the decoded media
need; the vectors are fixed, so the target costs a lookup instead of a decoder pass.

Retrieval: the final hidden state at a sample's first ``<EOS>`` is its embedding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_model, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from tokenization.vocab import VocabLayout
from training.attention import AttentionMask, Backend, attend, check_right_padded, resolve_backend
from training.caches import InstructionCache, KVCache, ResponseCache
from training.dfm import VocabGroups
from training.media_projection import MediaProjection
from training.model_config import ModelConfig
from training.packed_linear import PackedLinears
from training.rotary import RotaryTable, rotate

if TYPE_CHECKING:
    from tokenization.bundle import Tokenizers

MEDIA = ("image", "audio")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"


class OmniModel(nn.Module):
    """Backbone + media projections + heads; DFM (bidirectional) and AR (causal) forwards."""

    def __init__(self, config: ModelConfig, layout: VocabLayout, codebooks: dict[str, Tensor]):
        super().__init__()
        self.config, self.layout = config, layout
        self.groups = VocabGroups.from_layout(layout)
        for name in MEDIA:
            rows = codebooks[name].shape[0]
            if rows != self.groups.size[name]:
                raise ValueError(
                    f"{name} codebook has {rows} vectors, the layout's {name} block "
                    f"{self.groups.size[name]}"
                )
            self.register_buffer(f"codebook_{name}", codebooks[name].detach().float().clone())
        lm = self._causal_lm(config, self.groups.size["text"])
        self.backbone, self.lm_head = lm.model, lm.lm_head
        bb = config.backbone
        self.head_dim, self.scale = bb.head_dim, bb.head_dim**-0.5
        embed_std = float(self.backbone.embed_tokens.weight.detach().float().std())
        self.projections = nn.ModuleDict(
            {m: MediaProjection(codebooks[m], bb.hidden_size, config.projection, embed_std)
             for m in MEDIA}
        )  # fmt: skip
        self.media_heads = nn.ModuleDict(
            {m: nn.Linear(bb.hidden_size, self.groups.size[m]) for m in MEDIA}
        )
        self.reconstruction = nn.ModuleDict(
            {m: nn.Linear(bb.hidden_size, codebooks[m].shape[1]) for m in MEDIA}
        )
        for head in [*self.media_heads.values(), *self.reconstruction.values()]:
            nn.init.normal_(head.weight, std=bb.initializer_range)
            nn.init.zeros_(head.bias)
        # A DFM response is a run of identical <MASK> inputs: rotary positions tell them
        # apart only through attention to other tokens, which a small model from scratch
        # learns slowly (tiny on digits: one-token captions still at chance after 300
        # steps, 98% with these). Zero init leaves a pretrained backbone's function as it is.
        self.response_position = (
            nn.Embedding(config.response_positions, bb.hidden_size)
            if config.response_positions
            else None
        )
        if self.response_position is not None:
            nn.init.zeros_(self.response_position.weight)
        # A fresh float32 inv_freq: the backbone's buffer may have been loaded in bf16.
        rotary = Qwen2RotaryEmbedding(self.backbone.config)
        self.rotary = RotaryTable(rotary.inv_freq, float(rotary.attention_scaling))
        self.packed = PackedLinears() if config.cpu_linear == "onednn" else None
        self.to(config.torch_dtype)

    @staticmethod
    def _causal_lm(config: ModelConfig, text_rows: int) -> Qwen2ForCausalLM:
        """Random init from the backbone shape, or the local causal LM ``config.pretrained``."""
        if config.pretrained is None:
            return Qwen2ForCausalLM(config.backbone.to_qwen2(text_rows))
        lm = Qwen2ForCausalLM.from_pretrained(
            config.pretrained, local_files_only=True, dtype=config.torch_dtype
        )
        different = config.backbone.mismatches(lm.config)
        if different:
            detail = ", ".join(f"backbone.{k}: config {a}, pretrained {b}" for k, (a, b) in
                               different.items())  # fmt: skip
            raise ValueError(f"{config.pretrained} does not have the configured shape: {detail}")
        if "sliding_attention" in lm.config.layer_types:
            raise ValueError(f"{config.pretrained}: sliding-window attention is not supported")
        if lm.config.vocab_size != text_rows:
            lm.resize_token_embeddings(text_rows)
        return lm

    @classmethod
    def from_tokenizers(cls, config: ModelConfig, tokenizers: Tokenizers) -> OmniModel:
        """Build over a :class:`tokenization.bundle.Tokenizers` set (its layout and codebooks)."""
        codebooks = {
            "image": tokenizers.image.codebook_vectors(),
            "audio": tokenizers.audio.codebook_vectors(),
        }
        return cls(config, tokenizers.layout, codebooks)

    # ------------------------------------------------------------------ plumbing

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def backend(self) -> Backend:
        weight = self.lm_head.weight
        return resolve_backend(self.config.attention, weight.device, weight.dtype, self.head_dim)

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    def codebook(self, modality: str) -> Tensor:
        """Frozen ``(size, d)`` codebook vectors of ``image`` or ``audio``."""
        if modality not in MEDIA:
            raise KeyError(f"unknown modality {modality!r}; expected one of {MEDIA}")
        return getattr(self, f"codebook_{modality}")

    def linear(self, layer: nn.Linear, x: Tensor) -> Tensor:
        """``layer(x)``; at inference on the CPU through oneDNN-packed weights (see
        ``ModelConfig.cpu_linear``)."""
        if self.packed is None or torch.compiler.is_compiling():
            return layer(x)  # compiled code gets inductor's own kernels for F.linear
        return self.packed(layer, x)

    def linears(self, layers: tuple[nn.Linear, ...], x: Tensor) -> tuple[Tensor, ...]:
        """``layer(x)`` for each of ``layers``; packed, as one product (see ``linear``)."""
        if self.packed is None or torch.compiler.is_compiling():
            return tuple(layer(x) for layer in layers)
        return self.packed.fused(layers, x)

    def _mlp(self, layer: nn.Module, x: Tensor) -> Tensor:
        """The layer's gated MLP (Qwen2: ``down(act(gate(x)) * up(x))``) through ``linear``."""
        mlp = layer.mlp
        gate, up = self.linears((mlp.gate_proj, mlp.up_proj), x)
        return self.linear(mlp.down_proj, mlp.act_fn(gate) * up)

    def _qkv(
        self, layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, H) layer input -> rotated q (B, Hq, L, D), rotated k and v (B, Hkv, L, D)."""
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        shape = (*x.shape[:2], -1, self.head_dim)
        q, k, v = (
            out.view(shape).transpose(1, 2)
            for out in self.linears((attn.q_proj, attn.k_proj, attn.v_proj), h)
        )
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _finish(
        self,
        layer: nn.Module,
        x: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: AttentionMask,
        few: bool = False,
        backend: Backend | None = None,
    ) -> Tensor:
        """Attention of q over (k, v), output projection, residual, then the MLP block.

        ``few`` (inference with few queries): on the CPU under SDPA, attention as two matmuls
        (:meth:`_attend_few`) instead of SDPA, whose CPU kernel costs more per call than
        the whole product at one or a few dozen queries. ``backend`` overrides the model's
        (fixed-shape steps take SDPA: flash-attn's varlen calls read lengths on the host).
        """
        backend = backend or self.backend
        if few and q.device.type == "cpu" and backend == "sdpa":
            out = self._attend_few(q, k, v, mask)
        else:
            out = attend(q, k, v, mask, self.scale, backend)
        x = x + self.linear(layer.self_attn.o_proj, out.transpose(1, 2).reshape(*x.shape[:2], -1))
        return x + self._mlp(layer, layer.post_attention_layernorm(x))

    def _attend_few(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        """softmax(q k^T scale + mask) v with the grouped query heads of a key/value head
        stacked into one matmul; masks that depend on the query go to :func:`attend`."""
        allowed, is_causal = mask.dense(q.shape[2], k.shape[2], q.device)
        if is_causal or (allowed is not None and (allowed.dim() != 4 or allowed.shape[2] != 1)):
            return attend(q, k, v, mask, self.scale, self.backend)
        batch, heads, count, dim = q.shape
        groups = k.shape[1]
        scores = q.reshape(batch, groups, -1, dim) @ k.transpose(-1, -2) * self.scale
        if allowed is not None:
            scores = scores.masked_fill(~allowed, -math.inf)
        return (scores.softmax(-1) @ v).view(batch, heads, count, dim)

    def _layer(
        self, layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask
    ) -> Tensor:
        q, k, v = self._qkv(layer, x, cos, sin)
        return self._finish(layer, x, q, k, v, mask)

    @staticmethod
    def _key_valid(attention_mask: Tensor | None) -> Tensor | None:
        """None when there is no padding, so SDPA can take its mask-free (or is_causal) path."""
        if attention_mask is None:
            return None
        check_right_padded(attention_mask)
        return None if bool(attention_mask.all()) else attention_mask

    # ------------------------------------------------------------------ inputs and outputs

    def embed(self, ids: Tensor, response_offsets: Tensor | None = None) -> Tensor:
        """Unified ids Long[B, L] -> input vectors (B, L, H).

        Every position gets all three candidates (an embedding row, and each modality's
        projected codebook vector at a clamped local id) and keeps its group's: no data-
        dependent indexing, so no GPU synchronisation; the projections are tiny next to a
        transformer layer. ``response_offsets`` (Long, ``ids``' shape or broadcastable:
        position minus instruction length, negative in the instruction) add the response
        position embeddings where the config has them.
        """
        group = self.groups.group_of(ids.contiguous())
        text_rows = self.groups.size["text"]
        out = self.backbone.embed_tokens(ids.clamp(max=text_rows - 1))
        for name in MEDIA:
            local = (ids - self.groups.start[name]).clamp(0, self.groups.size[name] - 1)
            vectors = self.projections[name](self.codebook(name)[local].to(out.dtype))
            out = torch.where((group == self.groups.index(name))[..., None], vectors, out)
        if self.response_position is not None and response_offsets is not None:
            rows = self.response_position.num_embeddings
            offsets = response_offsets.expand(ids.shape)
            added = self.response_position(offsets.clamp(0, rows - 1)).to(out.dtype)
            out = out + added * (offsets >= 0)[..., None].to(out.dtype)
        return out

    def head_logits(self, hidden: Tensor, group: str) -> Tensor:
        """Float[N, H] hidden states at selected positions -> Float[N, size[group]] logits.

        Indices are local ids of the group (for ``text`` they equal unified ids).
        """
        return self.linear(self.head(group), hidden)

    def head(self, group: str) -> nn.Linear:
        """The output layer of head group ``group`` (the LM head for ``text``)."""
        if group == "text":
            return self.lm_head
        if group not in self.media_heads:
            raise KeyError(f"unknown head group {group!r}; expected one of {self.groups.names}")
        return self.media_heads[group]

    def reconstruct(self, hidden: Tensor, modality: str) -> Tensor:
        """Float[N, H] final hidden at ``modality`` positions -> Float[N, d_m] codebook vector."""
        if modality not in MEDIA:
            raise KeyError(f"unknown modality {modality!r}; expected one of {MEDIA}")
        return self.reconstruction[modality](hidden)

    def codebook_targets(self, ids: Tensor, modality: str) -> Tensor:
        """Long[N] clean unified ids of ``modality`` -> Float[N, d_m] frozen codebook vectors."""
        book = self.codebook(modality)
        local = ids - self.groups.start[modality]
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= book.shape[0]):
            raise ValueError(f"ids outside the {modality} block of the vocabulary")
        return book[local]

    # ------------------------------------------------------------------ full forwards

    def forward(
        self,
        ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        instruction_lengths: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        """Long[B, L] unified ids -> Float[B, L, H] final-normed hidden states.

        attention_mask: Bool[B, L], True = real token, right padding. instruction_lengths:
        Long[B] (DFM mode) or None = fully bidirectional. causal=True: AR mode (j <= i).
        Hidden states at padding positions are unspecified.
        """
        if causal and instruction_lengths is not None:
            raise ValueError("instruction_lengths is a DFM-mode mask; AR mode is causal only")
        mask = AttentionMask(self._key_valid(attention_mask), causal, instruction_lengths)
        offsets = None
        if instruction_lengths is not None:
            positions = torch.arange(ids.shape[1], device=ids.device)
            offsets = positions[None, :] - instruction_lengths.to(ids.device)[:, None]
        x = self.embed(ids, offsets)
        cos, sin = self.rotary.table(ids.shape[1], x.dtype, ids.device)
        recompute = self.config.gradient_checkpointing and self.training
        for layer in self.layers:
            if recompute and torch.is_grad_enabled():
                x = checkpoint(self._layer, layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = self._layer(layer, x, cos, sin, mask)
        return self.backbone.norm(x)

    def eos_embedding(
        self,
        ids: Tensor,
        attention_mask: Tensor | None = None,
        instruction_lengths: Tensor | None = None,
    ) -> Tensor:
        """Float[B, H]: the DFM-mode hidden state at each row's first real ``<EOS>``."""
        eos = ids == self.layout.special_id("<EOS>")
        if attention_mask is not None:
            eos = eos & attention_mask
        missing = (~eos.any(1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"rows {missing} have no <EOS> token")
        hidden = self.forward(
            ids, attention_mask=attention_mask, instruction_lengths=instruction_lengths
        )
        first = eos.int().argmax(1)  # argmax returns the first maximal index
        return hidden[torch.arange(ids.shape[0], device=ids.device), first]

    # ------------------------------------------------------------------ DFM caches

    def encode_instruction(
        self, ids: Tensor, attention_mask: Tensor | None = None
    ) -> InstructionCache:
        """Long[B, P] instruction (right padded) -> its per-layer keys and values.

        The last layer's attention output and MLP feed nothing cached, so they are skipped.
        """
        key_valid = self._key_valid(attention_mask)
        lengths = (
            attention_mask.sum(1)
            if attention_mask is not None
            else torch.full((ids.shape[0],), ids.shape[1], device=ids.device)
        )
        mask = AttentionMask(key_valid)
        x = self.embed(ids)
        cos, sin = self.rotary.table(ids.shape[1], x.dtype, ids.device)
        keys, values = [], []
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            keys.append(k)
            values.append(v)
            if index < last:
                x = self._finish(layer, x, q, k, v, mask)
        return InstructionCache(keys, values, lengths, key_valid)

    def forward_response(
        self,
        response: Tensor,
        instruction: InstructionCache,
        cache: ResponseCache | None = None,
        refresh_ratio: float | None = None,
        refresh_threshold: float | None = None,
        positions: Tensor | None = None,
        compiled: bool = False,
        reuse: ResponseCache | None = None,
    ) -> tuple[Tensor, ResponseCache]:
        """Long[B, R] response canvas -> (Float[B, R, H] hidden, the updated ResponseCache).

        Response position r of row b has rotary position ``lengths[b] + r`` and attends to
        the instruction's cached keys/values and every response position. Without a cache
        every position is computed. With one, each layer (dLLM-Cache, arXiv 2506.06295)
        computes the value vectors of all positions from its current input, recomputes only
        the positions whose value moved most (lowest cosine similarity to the cached one:
        the ``refresh_ratio`` fraction, or all below ``refresh_threshold``; at least one per
        row) and takes the cached layer output for the rest. Rows recompute the same count
        (the largest over the batch), so the work stays batched gathers.

        ``positions`` (Long[B, n], sorted per row; needs ``cache``): every layer recomputes
        exactly these positions of each row (their embeddings on up, nothing of the other
        positions, no value vectors of all) and keeps the cached keys/values and outputs
        elsewhere (Fast-dLLM's dual cache). The cache is then updated in place and returned.
        ``compiled``: that pass runs compiled, one graph per (B, R, n) shape (see
        :func:`compiled_positions_pass`). ``reuse``: an earlier cache of this generation
        whose in-place buffers take the new cache's values, so that a pass captured as a
        CUDA graph keeps writing to the same addresses after a full refresh.
        """
        batch, length = response.shape
        if positions is not None:
            if cache is None:
                raise ValueError("positions need a cache to take the other positions from")
            return self._forward_positions(response, instruction, cache, positions, compiled, reuse)
        if cache is not None:
            cached = cache.outputs[0].shape[:2]
            if tuple(cached) != (batch, length):
                raise ValueError(f"cache holds {tuple(cached)} (B, R), got {(batch, length)}")
            if (refresh_ratio is None) == (refresh_threshold is None):
                raise ValueError(
                    "with a cache give exactly one of refresh_ratio, refresh_threshold"
                )
            if refresh_ratio is not None and not 0 < refresh_ratio <= 1:
                raise ValueError(f"refresh_ratio must lie in (0, 1], got {refresh_ratio}")
        prompt = instruction.keys[0].shape[2]
        key_valid = instruction.key_valid
        if key_valid is not None:
            key_valid = torch.cat([key_valid, key_valid.new_ones(batch, length)], dim=1)
        mask = AttentionMask(key_valid)
        offsets = torch.arange(length, device=response.device)
        x = self.embed(response, offsets[None, :])
        cos, sin = self.rotary.at(instruction.lengths[:, None] + offsets, prompt + length, x.dtype)
        keys, values, outputs, recomputed = [], [], [], 0
        layers = zip(self.layers, instruction.keys, instruction.values, strict=True)
        for index, (layer, prompt_k, prompt_v) in enumerate(layers):
            if cache is None:
                q, k, v = self._qkv(layer, x, cos, sin)
                x = self._finish(layer, x, q, _cat(prompt_k, k), _cat(prompt_v, v), mask)
                recomputed += batch * length
            else:
                x, k, v, count = self._refresh_layer(
                    layer, x, cos, sin, (prompt_k, prompt_v), cache, index, mask,
                    refresh_ratio, refresh_threshold,
                )  # fmt: skip
                recomputed += batch * count
            keys.append(k)
            values.append(v)
            outputs.append(x)
        return self.backbone.norm(x), ResponseCache(keys, values, outputs, recomputed)

    def _forward_positions(
        self,
        response: Tensor,
        instruction: InstructionCache,
        cache: ResponseCache,
        picked: Tensor,
        compiled: bool = False,
        reuse: ResponseCache | None = None,
    ) -> tuple[Tensor, ResponseCache]:
        """``forward_response`` recomputing only ``picked`` (Long[B, n]) at every layer;
        ``compiled``: through :meth:`positions_pass` compiled (one graph per shape)."""
        batch, length = response.shape
        cached = cache.outputs[0].shape[:2]
        if tuple(cached) != (batch, length):
            raise ValueError(f"cache holds {tuple(cached)} (B, R), got {(batch, length)}")
        prompt = instruction.keys[0].shape[2]
        key_valid = instruction.key_valid
        if key_valid is not None:
            key_valid = torch.cat([key_valid, key_valid.new_ones(batch, length)], dim=1)
        if cache.joint_keys is None or cache.joint_values is None or cache.hidden is None:
            # One contiguous instruction + response buffer per layer, written in place from
            # now on: no concatenation per step.
            pairs = zip(instruction.keys, cache.keys, instruction.values, cache.values, strict=True)
            joint = [(_cat(pk, rk), _cat(pv, rv)) for pk, rk, pv, rv in pairs]
            if (
                reuse is not None
                and reuse.joint_keys is not None
                and reuse.joint_values is not None
                and reuse.joint_keys[0].shape == joint[0][0].shape
                and reuse.outputs[0].shape == cache.outputs[0].shape
            ):
                joint = [
                    (bk.copy_(k), bv.copy_(v))
                    for (k, v), bk, bv in zip(joint, reuse.joint_keys, reuse.joint_values,
                                              strict=True)
                ]  # fmt: skip
                cache.outputs = [b.copy_(x) for b, x in zip(reuse.outputs, cache.outputs,
                                                            strict=True)]  # fmt: skip
            cache.joint_keys = [k for k, _ in joint]
            cache.joint_values = [v for _, v in joint]
            if compiled and response.device.type == "cuda":
                for buffer in (*cache.joint_keys, *cache.joint_values, *cache.outputs):
                    torch._dynamo.mark_static_address(buffer)
            cache.keys = [k[:, :, prompt:] for k in cache.joint_keys]
            cache.values = [v[:, :, prompt:] for v in cache.joint_values]
            cache.hidden = self.backbone.norm(cache.outputs[-1])
        # The rotary table is grown here, never inside a compiled pass.
        cos, sin = self.rotary.table(prompt + length, cache.hidden.dtype, response.device)
        run = compiled_positions_pass(self) if compiled else self.positions_pass
        graphs = compiled and response.device.type == "cuda"
        if graphs:  # each call is a new step of the CUDA graph trees: replays may reuse outputs
            torch.compiler.cudagraph_mark_step_begin()
        # A new tensor: callers compare it with the previous step's.
        cache.hidden = run(
            response, picked, instruction.lengths, key_valid, cos, sin, cache.joint_keys,
            cache.joint_values, cache.outputs, cache.hidden,
        )  # fmt: skip
        if graphs:  # kept past the next replay, which overwrites the graph's own output
            cache.hidden = cache.hidden.clone()
        cache.recomputed = len(self.layers) * batch * picked.shape[1]
        return cache.hidden, cache

    def positions_pass(
        self,
        response: Tensor,
        picked: Tensor,
        lengths: Tensor,
        key_valid: Tensor | None,
        cos: Tensor,
        sin: Tensor,
        joint_keys: list[Tensor],
        joint_values: list[Tensor],
        outputs: list[Tensor],
        hidden: Tensor,
    ) -> Tensor:
        """The layers over the ``picked`` (Long[B, n]) positions of ``response`` Long[B, R]
        only, every tensor of fixed shape: writes their keys/values into ``joint_keys`` /
        ``joint_values`` (instruction then response, ``(B, Hkv, P + R, D)``) and their layer
        outputs into ``outputs`` (``(B, R, H)`` each), and returns ``hidden`` (B, R, H) with
        their final-normed states scattered in. ``lengths``: Long[B] real instruction
        tokens; ``key_valid``: Bool[B, P + R] or None; ``cos``/``sin``: the rotary table
        over at least ``P + R`` positions. Attention goes through SDPA on every device
        (flash-attn's varlen calls would read lengths back to the host at every step)."""
        prompt = joint_keys[0].shape[2] - response.shape[1]
        mask = AttentionMask(key_valid)
        x = self.embed(response.gather(1, picked), picked)  # (B, n, H)
        hidden_size = x.shape[-1]
        where = lengths[:, None] + picked
        cos, sin = cos[where].unsqueeze(1), sin[where].unsqueeze(1)
        rows = picked[:, :, None].expand(-1, -1, hidden_size)
        slots = (prompt + picked)[:, None, :, None]
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            where_kv = slots.expand(-1, k.shape[1], -1, self.head_dim)
            keys = joint_keys[index].scatter_(2, where_kv, k)
            values = joint_values[index].scatter_(2, where_kv, v)
            x = self._finish(layer, x, q, keys, values, mask, few=True, backend="sdpa")
            outputs[index].scatter_(1, rows, x)
        return hidden.scatter(1, rows, self.backbone.norm(x))

    def _refresh_layer(
        self,
        layer: nn.Module,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        prompt: tuple[Tensor, Tensor],
        cache: ResponseCache,
        index: int,
        mask: AttentionMask,
        ratio: float | None,
        threshold: float | None,
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """One layer of the cached response pass: (layer output, keys, values, positions/row)."""
        attn = layer.self_attn
        batch, length, hidden = x.shape
        h = layer.input_layernorm(x)
        v_all = self.linear(attn.v_proj, h)  # (B, R, Hkv * D)
        old_v = cache.values[index].transpose(1, 2).reshape(batch, length, -1)
        similarity = F.cosine_similarity(v_all, old_v, dim=-1)  # (B, R)
        if ratio is not None:
            count = max(1, math.ceil(ratio * length - 1e-9))
        else:
            count = max(1, int((similarity < threshold).sum(1).max()))
        picked = similarity.topk(count, dim=1, largest=False).indices.sort(dim=1).values
        rows = picked[:, :, None]
        heads = picked[:, None, :, None]
        h_sel = h.gather(1, rows.expand(-1, -1, hidden))
        shape = (batch, count, -1, self.head_dim)
        q = self.linear(attn.q_proj, h_sel).view(shape).transpose(1, 2)
        k = self.linear(attn.k_proj, h_sel).view(shape).transpose(1, 2)
        v = v_all.view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = v.gather(2, heads.expand(-1, v.shape[1], -1, self.head_dim))
        cos_sel = cos.gather(2, heads.expand(-1, -1, -1, self.head_dim))
        sin_sel = sin.gather(2, heads.expand(-1, -1, -1, self.head_dim))
        q, k = rotate(q, cos_sel, sin_sel), rotate(k, cos_sel, sin_sel)
        slots = heads.expand(-1, k.shape[1], -1, self.head_dim)
        keys = cache.keys[index].scatter(2, slots, k)
        values = cache.values[index].scatter(2, slots, v)
        x_sel = x.gather(1, rows.expand(-1, -1, hidden))
        out_sel = self._finish(
            layer, x_sel, q, _cat(prompt[0], keys), _cat(prompt[1], values), mask
        )
        out = cache.outputs[index].scatter(1, rows.expand(-1, -1, hidden), out_sel)
        return out, keys, values, count

    # ------------------------------------------------------------------ AR mode

    @torch.no_grad()
    def ar_prefill(
        self, ids: Tensor, attention_mask: Tensor | None = None, capacity: int | None = None
    ) -> KVCache:
        """Causal pass over a right-padded prompt Long[B, P] -> a KVCache to decode from.

        ``capacity`` pre-allocates room for the tokens to come (the cache grows anyway).
        Inference only: the cache is written in place.
        """
        batch, length = ids.shape
        key_valid = self._key_valid(attention_mask)
        lengths = (
            attention_mask.sum(1)
            if attention_mask is not None
            else torch.full((batch,), length, device=ids.device)
        )
        mask = AttentionMask(key_valid, causal=True)
        x = self.embed(ids)
        cos, sin = self.rotary.table(length, x.dtype, ids.device)
        keys, values = [], []
        for layer in self.layers:
            q, k, v = self._qkv(layer, x, cos, sin)
            keys.append(k)
            values.append(v)
            x = self._finish(layer, x, q, k, v, mask)
        hidden = self.backbone.norm(x)
        last = hidden[torch.arange(batch, device=ids.device), lengths - 1]
        kv = KVCache(keys, values, length, key_valid, lengths.clone(), last)
        kv.reserve(capacity or length)
        return kv

    @torch.no_grad()
    def ar_step(self, ids: Tensor, kv: KVCache) -> Tensor:
        """Append Long[B, n] tokens causally to ``kv`` -> their Float[B, n, H] hidden states."""
        count = ids.shape[1]
        start, end = kv.length, kv.length + count
        kv.reserve(end)
        key_valid = None if kv.key_valid is None else kv.key_valid[:, :end]
        mask = AttentionMask(key_valid, causal=True)
        x = self.embed(ids)
        positions = kv.positions[:, None] + torch.arange(count, device=ids.device)
        cos, sin = self.rotary.at(positions, end, x.dtype)
        for layer, keys, values in zip(self.layers, kv.keys, kv.values, strict=True):
            q, k, v = self._qkv(layer, x, cos, sin)
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            x = self._finish(layer, x, q, keys[:, :, :end], values[:, :, :end], mask, few=True)
        kv.length = end
        kv.positions = kv.positions + count
        hidden = self.backbone.norm(x)
        kv.last_hidden = hidden[:, -1]
        return hidden

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path, state: Mapping[str, Tensor] | None = None) -> None:
        """Weights (safetensors, tied tensors once), model config and vocabulary layout.

        ``state``: the weights to write instead of ``self.state_dict()`` (the full weights
        of a model whose own parameters are ZeRO-3 partitions), with the same keys.
        """
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        weights = _distinct_tensors(dict(state) if state is not None else self.state_dict())
        save_file(weights, str(folder / WEIGHTS_FILE), {"format": "pt"})
        # The weights now live here: a reload must not start from the pretrained LM again.
        config = self.config.model_copy(update={"pretrained": None})
        (folder / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
        self.layout.save(folder)

    @classmethod
    def load(cls, directory: str | Path) -> OmniModel:
        """Rebuild a model written by :meth:`save` (on the CPU)."""
        folder = Path(directory)
        config = ModelConfig.model_validate_json((folder / CONFIG_FILE).read_text())
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:
            codebooks = {m: weights.get_tensor(f"codebook_{m}") for m in MEDIA}
        model = cls(config, VocabLayout.load(folder), codebooks)
        load_model(model, str(folder / WEIGHTS_FILE))
        return model


# Distinct shapes a process may compile the positions pass for before torch falls back to
# eager for the rest (torch's default, 8, is two canvas lengths' worth of buckets).
POSITIONS_PASS_GRAPHS = 64


@functools.cache
def _compiled_positions_pass(device_type: str) -> Callable[..., Tensor]:
    mode = "reduce-overhead" if device_type == "cuda" else None
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, POSITIONS_PASS_GRAPHS
    )
    return torch.compile(OmniModel.positions_pass, fullgraph=True, dynamic=False, mode=mode)


def compiled_positions_pass(model: OmniModel) -> Callable[..., Tensor]:
    """``model.positions_pass`` through ``torch.compile`` (fullgraph, static shapes: one
    graph per model and (B, R, n) shape, reused by every later generation): on CUDA with
    ``mode="reduce-overhead"`` (the pass captured in a CUDA graph and replayed, one launch
    a step instead of one per kernel), on the CPU inductor's kernels."""
    return functools.partial(_compiled_positions_pass(model.device.type), model)


def _cat(prompt: Tensor, response: Tensor) -> Tensor:
    """Instruction then response along the sequence axis of ``(B, Hkv, L, D)``."""
    return torch.cat([prompt, response], dim=2)


def _distinct_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor once (a tied weight under its first name), copied to its own CPU storage.

    ``safetensors``' ``save_model`` refuses tensors that share a storage none of them covers,
    which is what a DeepSpeed engine leaves (every parameter a view of one flat buffer);
    ``load_model`` accepts the missing tied names.
    """
    out, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").clone().contiguous()
    return out
