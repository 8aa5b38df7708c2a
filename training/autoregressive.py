"""The autoregressive baseline on the DFM backbone: causal mask, next-token loss, greedy decoding.

Same ``OmniModel`` (embeddings, layers, heads) as the DFM model; only the attention mask
(``causal=True``: position ``i`` sees ``j <= i``) and the objective change, so the two can be
compared at equal size. The loss is the usual next-token cross-entropy on the response:

    L = - 1/|R| sum_{i in R} log p_theta(x_i | x_{<i})

over the response positions ``R`` (targets at ``i >= instruction_length``), each scored by
the head of its target's group (text ids and specials by the text head, image and audio
ids by theirs). Decoding is greedy with a KV cache (``ar_prefill`` then one ``ar_step`` per
token), restricted to one group's head, and stops at ``<EOS>`` or after ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from training.dfm import cross_entropy_sum
from training.model import OmniModel


def ar_loss(
    model: OmniModel,
    ids: Tensor,
    instruction_lengths: Tensor,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Mean next-token cross-entropy over the response tokens of a batch.

    ids: Long[B, L] unified ids (instruction then response, right padding);
    instruction_lengths: Long[B]; attention_mask: Bool[B, L] (True = real token) or None.
    """
    hidden = model.forward(ids, attention_mask=attention_mask, causal=True)
    targets = ids[:, 1:]
    positions = torch.arange(1, ids.shape[1], device=ids.device)
    scored = positions[None, :] >= instruction_lengths[:, None]
    if attention_mask is not None:
        scored = scored & attention_mask[:, 1:]
    if not bool(scored.any()):
        raise ValueError("no response token to predict")
    inputs, targets = hidden[:, :-1][scored], targets[scored]
    group = model.groups.group_of(targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for index, name in enumerate(model.groups.names):
        rows = group == index
        if bool(rows.any()):
            logits = model.head_logits(inputs[rows], name)
            total = total + cross_entropy_sum(logits, targets[rows] - model.groups.start[name])
    return total / targets.numel()


@torch.inference_mode()
def ar_generate(
    model: OmniModel,
    instruction: Tensor,
    max_new_tokens: int,
    group: str = "text",
    eos_id: int | None = None,
    instruction_mask: Tensor | None = None,
) -> Tensor:
    """Greedy decoding with the KV cache: Long[B, P] instruction -> Long[B, n] new ids.

    Every token is the argmax of ``group``'s head (unified ids out). With ``eos_id``, a row
    is finished once it emits it and decoding stops when every row is (``n`` is then the
    longest row's length; later positions of finished rows hold ``eos_id``); without it,
    exactly ``max_new_tokens`` tokens. ``instruction_mask``: Bool[B, P], right padding.
    """
    start = model.groups.start[group]
    kv = model.ar_prefill(
        instruction, instruction_mask, capacity=instruction.shape[1] + max_new_tokens
    )

    def advance(token: Tensor) -> Tensor:
        return model.head_logits(model.ar_step(token[:, None], kv)[:, -1], group).argmax(-1) + start

    first = model.head_logits(kv.last_hidden, group).argmax(-1) + start
    return greedy_tokens(first, advance, max_new_tokens, eos_id)


def greedy_tokens(
    first: Tensor, advance: Callable[[Tensor], Tensor], max_new_tokens: int, eos_id: int | None
) -> Tensor:
    """Long[B] first tokens, then ``advance(token)`` -> the next Long[B], as one Long[B, n].

    With ``eos_id``, a row is finished once it emits it (later positions hold ``eos_id``) and
    decoding stops when every row is; without it, exactly ``max_new_tokens`` tokens.
    """
    token = first
    finished = torch.zeros_like(token, dtype=torch.bool)
    tokens = []
    for _ in range(max_new_tokens):
        if eos_id is not None:
            token = torch.where(finished, eos_id, token)
            finished |= token == eos_id
        tokens.append(token)
        if len(tokens) == max_new_tokens or (eos_id is not None and bool(finished.all())):
            break
        token = advance(token)
    return torch.stack(tokens, 1)
