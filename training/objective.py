"""The training objective per micro-batch: summed loss terms and the tokens they cover.

NExT-OMNI trains ``L = l1 L_ce + l2 L_rec^V + l3 L_rec^A``. Every term here is a *sum*
over the positions it scores, returned with the count of those positions; the trainer
divides each sum by its count over the whole accumulation window on every rank
(:func:`window_scales`), so a token weighs the same whatever the length of its
micro-batch or the rank that saw it.

* ``ce``: DFM x-prediction cross-entropy at the corrupted response positions, each scored
  by its group's head (``training.dfm.cross_entropy_sum``; or the generalized KL), or, with
  ``objective=ar``, the next-token cross-entropy of the causal baseline.
* ``rec_image`` / ``rec_audio``: squared error between ``OmniModel.reconstruct`` and the
  frozen codebook vector of the clean id, at the same corrupted positions of that
  modality, averaged over the vector's dimensions (see ``training/model.py``).
* ``align`` (when ``align_temperature`` is set, on ``X2text`` micro-batches only): the
  ``<EOS>`` InfoNCE of ``training/alignment.py``, summed over the micro-batch's pairs.

Corruption happens in :meth:`Objective.prepare`, before any forward pass, with a generator
seeded per micro-batch: the counts of the window are known before its first backward, and
a resumed run corrupts exactly as the uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.alignment import Pairs, contrastive_sum, pairs_of
from training.dfm import ProbPath, cross_entropy_sum, generalized_kl_sum
from training.micro_batch import MicroBatch
from training.model import MEDIA, OmniModel
from training.train_config import WINDOW_TERMS


@dataclass
class Prepared:
    """A micro-batch ready for the forward pass: ``inputs`` Long[B, L] (``x_t`` for DFM, the
    clean ids for AR), ``targets`` Long[B, L] clean ids aligned with the scored positions,
    ``scored`` Bool[B, L], ``t`` Float[B] (DFM; zeros for AR), ``counts`` per term,
    ``pairs``: the alignment term's (medium, text) pairs, or None."""

    batch: MicroBatch
    inputs: Tensor
    targets: Tensor
    scored: Tensor
    t: Tensor
    counts: dict[str, int]
    pairs: Pairs | None = None


class Objective(nn.Module):
    """Wraps the model so one ``forward`` returns every term's sum; DeepSpeed drives it.

    ``forward`` returns ``(sums, hidden, anchor)``: ``sums[term]`` Float[] for every term of
    the objective (``ce``, and ``rec_image`` / ``rec_audio`` for DFM; zero without tokens);
    the final hidden states (B, L, H) whose gradient GradNorm measures per term; and
    ``anchor``, a zero that depends on every head, added to the loss so each parameter
    gets a gradient (zero if unused) in every micro-batch on every rank, which ZeRO's
    gradient reduction expects.

    ``align_temperature``: adds the ``align`` term (``training/alignment.py``) at that
    InfoNCE temperature; None = off.
    """

    def __init__(
        self,
        model: OmniModel,
        kind: str,
        path: ProbPath | None,
        loss: str,
        align_temperature: float | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("dfm", "ar"):
            raise ValueError(f"unknown objective {kind!r}; expected dfm or ar")
        if kind == "dfm" and path is None:
            raise ValueError("the dfm objective needs a probability path")
        self.model, self.kind, self.path, self.loss = model, kind, path, loss
        self.align_temperature = align_temperature

    # ------------------------------------------------------------------ before the forward

    def prepare(self, batch: MicroBatch, generator: torch.Generator) -> Prepared:
        """Corrupt (DFM) or shift (AR) ``batch`` on its device; count each term's tokens
        (the ``align`` term counts pairs)."""
        prepared = (
            self._prepare_ar(batch) if self.kind == "ar" else self._prepare_dfm(batch, generator)
        )
        if self.align_temperature is not None:
            prepared.pairs = pairs_of(batch, self.model.layout)
            prepared.counts["align"] = 0 if prepared.pairs is None else len(batch.keys)
        return prepared

    def _prepare_dfm(self, batch: MicroBatch, generator: torch.Generator) -> Prepared:
        ids, response = batch.ids, batch.response_mask
        t = torch.rand(ids.shape[0], generator=generator, device=ids.device)
        xt = self.path.sample(ids, t, response, generator)
        scored = self.path.loss_mask(xt, ids, response)
        return Prepared(batch, xt, ids, scored, t, self._counts(ids, scored))

    def _prepare_ar(self, batch: MicroBatch) -> Prepared:
        # Position i predicts token i + 1: score i where the target i + 1 is a response token.
        ids = batch.ids
        targets = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
        scored = torch.zeros_like(batch.attention_mask)
        scored[:, :-1] = batch.response_mask[:, 1:]
        counts = {"ce": int(scored.sum())}
        zeros = torch.zeros(ids.shape[0], device=ids.device)
        return Prepared(batch, ids, targets, scored, zeros, counts)

    def _counts(self, targets: Tensor, scored: Tensor) -> dict[str, int]:
        group = self.model.groups.group_of(targets)
        counts = {"ce": int(scored.sum())}
        for name in MEDIA:
            counts[f"rec_{name}"] = int((scored & (group == self.model.groups.index(name))).sum())
        return counts

    # ------------------------------------------------------------------ the forward

    def forward(
        self,
        inputs: Tensor,
        attention_mask: Tensor,
        instruction_lengths: Tensor,
        targets: Tensor,
        scored: Tensor,
        t: Tensor,
        pairs: Pairs | None = None,
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        model = self.model
        if self.kind == "ar":
            hidden = model(inputs, attention_mask=attention_mask, causal=True)
        else:
            hidden = model(
                inputs, attention_mask=attention_mask, instruction_lengths=instruction_lengths
            )
        sums = self.term_sums(hidden, inputs, targets, scored, t)
        if pairs is not None:
            media = model.eos_embedding(pairs.media, pairs.media_mask)
            texts = model.eos_embedding(pairs.texts, pairs.text_mask)
            sums["align"] = contrastive_sum(media, texts, pairs.positives, self.align_temperature)
        return sums, hidden, self._anchor(hidden)

    def term_sums(
        self,
        hidden: Tensor,
        inputs: Tensor,
        targets: Tensor,
        scored: Tensor,
        t: Tensor,
        detached_heads: bool = False,
    ) -> dict[str, Tensor]:
        """Every term's sum from the final ``hidden`` (B, L, H): each term of the objective,
        zero when the micro-batch scores none of its tokens.

        ``detached_heads``: the heads run as plain functions of detached weights, so the
        graph reaches ``hidden`` and nothing else. GradNorm takes per-term gradients that
        way: a backward through the heads' modules would run DeepSpeed's gradient hooks.
        """
        model = self.model
        h, y = hidden[scored], targets[scored]
        group = model.groups.group_of(y)
        t_rows = t[:, None].expand_as(scored)[scored]
        xt = inputs[scored]
        ce = hidden.new_zeros((), dtype=torch.float32)
        reconstruction: dict[str, Tensor] = {}
        # Every head runs on every micro-batch, on zero rows where none of its tokens is
        # scored: under ZeRO-3 each module call gathers the module's partitioned weights
        # (a collective), so every rank must call the same modules in the same order
        # whatever its micro-batch holds. Skipping an empty head hangs a multi-rank run.
        for index, name in enumerate(model.groups.names):
            rows = group == index
            logits = _linear(model.head(name), h[rows], detached_heads)
            ce = ce + self._group_loss(logits, y[rows], xt[rows], t_rows[rows], name)
            if name in MEDIA and self.kind == "dfm":
                predicted = _linear(model.reconstruction[name], h[rows], detached_heads)
                target = model.codebook_targets(y[rows], name).float()
                error = (predicted.float() - target).pow(2).mean(-1).sum()
                reconstruction[f"rec_{name}"] = error
        return {"ce": ce, **reconstruction}

    def _group_loss(self, logits: Tensor, y: Tensor, xt: Tensor, t: Tensor, group: str) -> Tensor:
        start = self.model.groups.start[group]
        if self.kind == "dfm" and self.loss == "generalized_kl":
            local = self.path.local_state(xt, group)
            return generalized_kl_sum(logits, y - start, local, t, self.path.scheduler)
        return cross_entropy_sum(logits, y - start)

    def _anchor(self, hidden: Tensor) -> Tensor:
        first = hidden[:, 0]
        outputs = [self.model.head_logits(first, g) for g in self.model.groups.names]
        outputs += [self.model.reconstruct(first, m) for m in MEDIA]
        return sum(out.float().sum() for out in outputs) * 0.0


def _linear(layer: nn.Linear, x: Tensor, detached: bool) -> Tensor:
    if not detached:
        return layer(x)
    bias = None if layer.bias is None else layer.bias.detach()
    return F.linear(x, layer.weight.detach(), bias)


def window_scales(totals: Mapping[str, float], world: int, grad_accum: int) -> dict[str, float]:
    """Multiplier of each term's micro-batch sum so the optimiser sees ``sum / N_window``.

    ``totals[term]``: scored tokens of the term over the whole accumulation window on every
    rank. DeepSpeed divides a micro-batch loss by ``grad_accum`` and averages gradients over
    ``world`` ranks; multiplying by ``world * grad_accum / N`` undoes both, so the step's
    gradient is that of ``(sum over every micro-batch and rank) / N``. A term with no token in
    the window gets no scale (it does not occur).
    """
    return {
        term: world * grad_accum / float(n)
        for term, n in totals.items()
        if term in WINDOW_TERMS and n
    }
