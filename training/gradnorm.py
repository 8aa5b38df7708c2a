"""Loss-term weights: GradNorm (Chen et al. 2018, arXiv 1711.02257) or fixed.

GradNorm balances the terms ``L_i`` of ``L = sum_i w_i L_i`` by their gradient norms at
the last shared layer. With ``G_i = w_i ||grad_W L_i||``, ``G_bar`` their mean, the
inverse training rate ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))`` and the target
``G_bar r_i^alpha`` (held constant), the weights descend

    L_grad = sum_i | G_i - G_bar r_i^alpha |,   dL_grad/dw_i = sign(G_i - target_i) ||grad_W L_i||

once per optimizer step (the step divided by the mean norm, so ``gradnorm_lr`` does not
depend on the scale of the losses), then are renormalised to sum to the number of terms. A term that
trains slower than the others (larger ``r_i``) gets a larger target and its weight grows.

Here ``W`` is the final hidden state all heads read (the last shared layer's output). Its
gradient is cheap (it flows through the heads only) and exists under every ZeRO stage,
where a partitioned weight has no full gradient to take a norm of. The norms of the
micro-batches of one step add in squares, since their activations are disjoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


class FixedWeights:
    """Constant ``w_i`` (the ``loss_weights`` of the config)."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = {k: float(v) for k, v in weights.items()}

    def update(self, losses: Mapping[str, float], grad_norms: Mapping[str, float]) -> None:
        """Nothing to learn."""

    def state_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weights = {k: float(v) for k, v in state["weights"].items()}


class GradNorm:
    """GradNorm weights for ``terms``, starting at ``initial`` (renormalised)."""

    def __init__(
        self, terms: Sequence[str], initial: Mapping[str, float], alpha: float, lr: float
    ) -> None:
        self.terms = list(terms)
        self.alpha, self.lr = float(alpha), float(lr)
        self.weights = self._normalised({t: float(initial.get(t, 1.0)) for t in self.terms})
        self.initial_losses: dict[str, float] = {}

    def _normalised(self, weights: dict[str, float]) -> dict[str, float]:
        positive = {t: max(w, 1e-6) if w > 0 else 0.0 for t, w in weights.items()}
        active = [t for t, w in positive.items() if w > 0]
        total = sum(positive[t] for t in active)
        if not active or total <= 0:
            return positive
        return {t: (w * len(active) / total if w > 0 else 0.0) for t, w in positive.items()}

    def update(self, losses: Mapping[str, float], grad_norms: Mapping[str, float]) -> None:
        """One GradNorm step from this optimizer step's unweighted ``losses`` ``L_i`` and the
        norms ``||grad_W L_i||``; terms absent from either (no token this step) are left as
        they are. The first loss seen of a term is its ``L_i(0)``."""
        present = [
            t
            for t in self.terms
            if t in losses and t in grad_norms and self.weights[t] > 0 and losses[t] > 0
        ]
        for term in present:
            self.initial_losses.setdefault(term, float(losses[term]))
        if len(present) < 2:
            return  # one term alone has nothing to be balanced against
        ratios = {t: losses[t] / self.initial_losses[t] for t in present}
        mean_ratio = sum(ratios.values()) / len(present)
        g = {t: self.weights[t] * grad_norms[t] for t in present}
        g_bar = sum(g.values()) / len(present)
        mean_norm = sum(grad_norms[t] for t in present) / len(present)
        if mean_norm <= 0:
            return
        weights = dict(self.weights)
        for term in present:
            target = g_bar * (ratios[term] / mean_ratio) ** self.alpha
            direction = math.copysign(1.0, g[term] - target) if g[term] != target else 0.0
            weights[term] -= self.lr * direction * grad_norms[term] / mean_norm
        self.weights = self._normalised(weights)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "initial_losses": dict(self.initial_losses)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weights = {k: float(v) for k, v in state["weights"].items()}
        self.initial_losses = {k: float(v) for k, v in state["initial_losses"].items()}
