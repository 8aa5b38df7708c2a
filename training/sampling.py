"""Samplers for discrete flow matching: Euler CTMC, confidence unmasking, dynamic length.

Every sampler works on a **response canvas** (:class:`Canvas`): unified ids ``(B, R)`` and,
per position, the head group that denoises it (``-1`` for fixed structure tokens such as
``<BOI>``). The model is reached only through a :class:`Predictor`: given the canvas it
returns logits at the positions asked for, one head group at a time, so that no
full-vocabulary tensor is ever built at every position. Tests drive the samplers with
oracle predictors; :class:`~training.model_predictor.ModelPredictor` wraps an
``OmniModel`` (with or without the adaptive cache).

Samplers:

* :func:`euler_sample` - any probability path. From ``t = 0`` to ``1`` in ``steps`` steps of
  ``h = 1 / steps``: draw ``x1 ~ p_theta(x1 | x_t)`` (the model posterior, tempered), then take
  one Euler step of the CTMC with the *conditional* velocity ``u_t(x | x_t, x1)`` of the path
  (``path.euler_step``); averaging over the drawn ``x1`` gives the marginal velocity
  ``u_t(x | x_t) = E_{x1 ~ p(x1|x_t)} u_t(x | x_t, x1)`` (Gat et al. 2024, arXiv 2407.15595,
  Alg. 1; FUDOKI arXiv 2505.20147 for the metric path). The last step lands on the drawn
  ``x1`` (``p_1(x | x1) = delta_{x1}``).
* :func:`confidence_unmask` - the masked path only. Each step predicts every still-masked
  position, ``x_hat = argmax`` (or a tempered draw) with confidence ``p_theta(x_hat)``, and
  commits the most confident ones: ``k`` per step (``tokens_per_step``, or the masked count
  spread evenly over the remaining ``steps``), or all with confidence above ``tau`` (at least
  one; at least ``k`` with both set); the others stay masked ("low-confidence remasking",
  LLaDA arXiv 2502.09992, Alg. 5; the threshold is Fast-dLLM's parallel decoding).
  With ``decode_block`` it works block by block, left to right (semi-autoregressive, LLaDA;
  Fast-dLLM arXiv 2505.22618), the later blocks kept on the canvas as ``<MASK>``.

Which canvas to denoise (dynamic length for text, fixed structure for media) is
:mod:`training.generation`'s business.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from tokenization.vocab import VocabLayout
from training.config import SamplerConfig
from training.dfm import ProbPath, VocabGroups

FIXED = -1  # group index of a canvas position that is never denoised


class Predictor(Protocol):
    """The model as the samplers see it.

    ``response``: Long[B, R] unified ids of the current canvas. ``select[g]``: Bool[B, R], the
    positions whose head-``g`` logits are wanted. Returns ``{g: Float[N_g, V_g]}``, the logits
    (local ids of group ``g``) at the True positions of ``select[g]`` in row-major order.
    """

    def __call__(self, response: Tensor, select: Mapping[str, Tensor]) -> dict[str, Tensor]: ...


@dataclass
class Canvas:
    """A response being generated: ``ids`` Long[B, R] unified ids and ``group`` Long[B, R],
    the index (into ``VocabGroups.names``) of the head denoising each position, or
    :data:`FIXED` for positions that keep their id (structure tokens, DGS padding)."""

    ids: Tensor
    group: Tensor

    @property
    def free(self) -> Tensor:
        """Bool[B, R]: positions the sampler denoises."""
        return self.group != FIXED


@dataclass(frozen=True)
class Vocabulary:
    """The unified vocabulary as the samplers see it: its layout and head groups."""

    layout: VocabLayout
    groups: VocabGroups

    @classmethod
    def from_layout(cls, layout: VocabLayout) -> Vocabulary:
        return cls(layout, VocabGroups.from_layout(layout))

    @property
    def mask_id(self) -> int:
        return self.layout.special_id("<MASK>")

    @property
    def eos_id(self) -> int:
        return self.layout.special_id("<EOS>")

    @property
    def pad_id(self) -> int:
        return self.layout.special_id("<PAD>")


# --------------------------------------------------------------------------- posterior draws


def group_probabilities(logits: Tensor, group: str, vocab: Vocabulary) -> Tensor:
    """Float[N, V_g] softmax of one head's logits, with ``<MASK>`` (never a clean token,
    though the text head covers its id) given probability 0."""
    logits = logits.float()
    mask_local = vocab.mask_id - vocab.groups.start[group]
    if 0 <= mask_local < vocab.groups.size[group]:
        logits = logits.index_fill(-1, torch.tensor([mask_local], device=logits.device), -math.inf)
    return logits.softmax(-1)


def _draw(
    probs: Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """(tokens Long[N], confidence Float[N]): the argmax (temperature 0) or a draw from
    ``softmax(log p / T)``; the confidence is the untempered ``p(token)``, as in LLaDA.
    A ``generator`` must live on ``probs``' device."""
    if temperature == 0:
        tokens = probs.argmax(-1)
    else:
        tempered = probs if temperature == 1 else torch.softmax(probs.log() / temperature, -1)
        tokens = torch.multinomial(tempered, 1, generator=generator).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def predict_tokens(
    predictor: Predictor,
    canvas: Canvas,
    active: Tensor,
    vocab: Vocabulary,
    temperature: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw ``x1 ~ p_theta(. | x_t)`` at the ``active`` (Bool[B, R]) positions, each from its
    own head, with one predictor call.

    Returns (Long[B, R]: the drawn unified ids where active, the canvas elsewhere;
    Float[B, R]: the confidence ``p_theta(x1)`` where active, 0 elsewhere).
    """
    select = {}
    for index, name in enumerate(vocab.groups.names):
        where = active & (canvas.group == index)
        if where.any():
            select[name] = where
    logits = predictor(canvas.ids, select)
    x1 = canvas.ids.clone()
    confidence = torch.zeros(canvas.ids.shape, device=canvas.ids.device)
    for name, where in select.items():
        probs = group_probabilities(logits[name], name, vocab)
        tokens, conf = _draw(probs, temperature, generator)
        x1[where] = tokens + vocab.groups.start[name]
        confidence[where] = conf
    return x1, confidence


# --------------------------------------------------------------------------- samplers


def prior_sample(
    path: ProbPath,
    canvas: Canvas,
    vocab: Vocabulary,
    generator: torch.Generator | None = None,
) -> Canvas:
    """The canvas with every free position drawn from the path's source ``p_0``.

    ``p_0(x | x1)`` depends on ``x1`` only through its group (masked path: ``<MASK>``;
    uniform and metric paths: uniform over the group), so ``x1`` is taken as the group's
    first id and the path's own ``sample`` at ``t = 0`` gives ``x_0``.
    """
    starts = torch.tensor(
        [vocab.groups.start[name] for name in vocab.groups.names], device=canvas.ids.device
    )
    free = canvas.free
    anchor = torch.where(free, starts[canvas.group.clamp(min=0)], canvas.ids)
    t = torch.zeros(canvas.ids.shape[0], device=canvas.ids.device)
    ids = path.sample(anchor, t, free, generator=generator)
    return Canvas(torch.where(free, ids, canvas.ids), canvas.group)


def euler_sample(
    predictor: Predictor,
    path: ProbPath,
    canvas: Canvas,
    vocab: Vocabulary,
    steps: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Canvas:
    """Integrate the CTMC from ``x_0`` (the free positions of ``canvas``) to ``t = 1``.

    Step ``s`` at ``t = s h``, ``h = 1 / steps``: ``x1 ~ p_theta(. | x_t)`` at the positions
    that can still move (``path.loss_mask``: masked positions for the masked path, every
    free position otherwise), then ``x_{t+h} = path.euler_step(x_t, x1, t, h)``, which jumps
    with the conditional velocity (mixture paths: to ``x1`` with probability
    ``(kappa_{t+h} - kappa_t) / (1 - kappa_t) ~ h kappa'_t / (1 - kappa_t)``). The step that
    reaches ``t = 1`` lands on ``x1``, since ``p_1(x | x1) = delta_{x1}``.
    """
    h = 1.0 / steps
    free = canvas.free
    for step in range(steps):
        active = path.loss_mask(canvas.ids, canvas.ids, free)
        if not active.any():
            break
        x1, _ = predict_tokens(predictor, canvas, active, vocab, temperature, generator)
        ids = canvas.ids.clone()
        t = torch.tensor(step * h, device=ids.device)
        ids[active] = path.euler_step(ids[active], x1[active], t, h, generator=generator)
        canvas = Canvas(ids, canvas.group)
    return canvas


def commit_positions(
    confidence: Tensor, masked: Tensor, k: Tensor | None = None, tau: float | None = None
) -> Tensor:
    """Bool[B, R]: the masked positions to unmask this step.

    ``k`` (Long[B]): the ``k`` most confident masked positions of each row. ``tau``: every
    masked position with confidence above ``tau`` and, in a row where none is, its most
    confident one, so that every step makes progress. Both: the ``k`` most confident and
    every other one above ``tau`` (a floor of ``k`` tokens a step, more where the model is
    sure: Fast-dLLM's threshold decoding on top of a fixed budget).
    """
    score = confidence.masked_fill(~masked, -math.inf)
    if k is None and tau is None:
        raise ValueError("give k or tau")
    if k is None:
        k = masked.any(1).long()  # the most confident one where none is above tau
    order = score.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(score.shape[1], device=score.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    commit = masked & (rank < k[:, None])
    if tau is not None:
        commit |= masked & (confidence > tau)
    return commit


def _per_step(
    masked: Tensor, step: int | Tensor, config: SamplerConfig, steps: int | None = None
) -> Tensor | None:
    """Long[B] tokens to commit per row at ``step`` (int, or Long[B] per row), or None in
    threshold mode without ``tokens_per_step``.

    Without ``tokens_per_step`` the remaining masked count is spread evenly over the
    remaining of ``steps`` (default ``config.steps``; LLaDA's ``get_num_transfer_tokens``),
    so the canvas (block) is clean after that many steps.
    """
    if config.tokens_per_step is not None:
        return torch.full(masked.shape[:1], config.tokens_per_step, device=masked.device)
    if config.tau is not None:
        return None
    remaining = masked.sum(1)
    steps_left = ((steps or config.steps) - torch.as_tensor(step, device=masked.device)).clamp(
        min=1
    )
    return torch.div(remaining + steps_left - 1, steps_left, rounding_mode="floor").clamp(min=1)


def current_block(masked: Tensor, block: int) -> Tensor:
    """Bool[B, R]: each row's masked positions in its leftmost block of ``block`` positions
    that still holds one (semi-autoregressive decoding, LLaDA / Fast-dLLM)."""
    width = masked.shape[1]
    positions = torch.arange(width, device=masked.device)
    first = torch.where(masked, positions, width).amin(1)  # width when nothing is masked
    start = torch.div(first, block, rounding_mode="floor") * block
    return masked & (positions[None, :] < (start + block)[:, None])


def confidence_unmask(
    predictor: Predictor,
    canvas: Canvas,
    vocab: Vocabulary,
    config: SamplerConfig,
    generator: torch.Generator | None = None,
) -> Canvas:
    """Masked path: unmask the canvas's ``<MASK>`` free positions by confidence.

    Each step predicts every masked position (``x_hat``, confidence ``p_theta(x_hat)``) and
    commits the ones chosen by :func:`commit_positions`; committed tokens are final.

    With ``decode_block`` only the masked positions of each row's current block (the
    leftmost one still holding a masked position) are predicted and committed; the blocks
    are unmasked left to right, the canvas keeps its full length (later blocks stay
    ``<MASK>``, which the model sees, as in training). Without ``tokens_per_step`` or
    ``tau``, each block gets ``steps * decode_block / R`` steps (at least one).
    """
    masked = canvas.free & (canvas.ids == vocab.mask_id)
    block = config.decode_block
    width = canvas.ids.shape[1]
    block_steps = None if block is None else max(1, config.steps * block // max(width, 1))
    step: int | Tensor = 0 if block is None else torch.zeros_like(masked[:, 0], dtype=torch.long)
    while masked.any():
        active = masked if block is None else current_block(masked, block)
        x1, confidence = predict_tokens(
            predictor, canvas, active, vocab, config.temperature, generator
        )
        count = _per_step(active, step, config, block_steps)
        commit = commit_positions(confidence, active, count, config.tau)
        canvas = Canvas(torch.where(commit, x1, canvas.ids), canvas.group)
        masked = masked & ~commit
        if block is None:
            step += 1
        else:  # a row whose block is done starts the next one at its step 0
            step = torch.where((active & ~commit).any(1), step + 1, 0)
    return canvas
