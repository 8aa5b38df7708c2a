"""The metric-induced probability path and its kinetic-optimal velocity (FUDOKI).

FUDOKI (arXiv 2505.20147, metric-induced probability paths): with unit vectors
``e_x`` of the tokens of one head group (an image/audio codebook, or the text embeddings),

    d(x, y)      = ||e_x - e_y||^4 = (2 - 2 <e_x, e_y>)^2
                   (the squared squared-Euclidean distance of FUDOKI's released ``metric``)
    p_t(x | x1)  = softmax_x(-beta_t d(x, x1))      uniform at t = 0, delta_{x1} at t = 1
    u_t(x | z, x1) = p_t(x | x1) dbeta_t relu(d(z, x1) - d(x, x1))       for x != z,

the kinetic-optimal velocity of Shaul et al. (arXiv 2412.03487) for this path:
``d/dt p_t(x|x1) = dbeta_t p_t(x|x1) (E_{p_t}[d] - d(x, x1))``, and the relu form satisfies
the Kolmogorov forward equation with that derivative. A token moves only to tokens nearer
to ``x1`` than itself.

Memory: a (positions x V) block of distances is built ``max_elements`` entries at a time
(chunks of positions), never the whole (positions x V) tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from training.config import DEFAULT_MAX_ELEMENTS
from training.dfm.groups import VocabGroups
from training.dfm.mixture_paths import END_TOL, per_position
from training.dfm.schedulers import MetricScheduler


def metric_distance(a: Tensor, b: Tensor) -> Tensor:
    """``d`` between unit vectors: Float[n, m] from ``a``: Float[n, D], ``b``: Float[m, D]."""
    return (2 - 2 * a @ b.T).clamp_min(0) ** 2


def inverse_cdf(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Index drawn from each row of non-negative ``weights`` [n, V] with ``uniforms`` [n].

    Drawing with pre-drawn uniforms makes the result independent of how rows are chunked.
    """
    cdf = weights.cumsum(-1)
    target = (uniforms * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(weights.shape[-1] - 1)


class MetricPath:
    """FUDOKI's metric-induced path on each head group's own vectors.

    ``vectors[g]``: Float[size[g], D_g] (a codebook, or the text embedding table; copied
    and L2-normalised here, so later training of the source does not move the path).
    ``max_elements`` bounds every (positions x V) block that is built.
    """

    def __init__(
        self,
        scheduler: MetricScheduler,
        groups: VocabGroups,
        vectors: dict[str, Tensor],
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        for name, table in vectors.items():
            if name not in groups.size:
                raise KeyError(f"vectors for unknown group {name!r}; groups: {groups.names}")
            if table.ndim != 2 or table.shape[0] != groups.size[name]:
                raise ValueError(
                    f"vectors[{name!r}] must be ({groups.size[name]}, D), got {tuple(table.shape)}"
                )
        if max_elements < 1:
            raise ValueError(f"max_elements must be positive, got {max_elements}")
        self.scheduler = scheduler
        self.groups = groups
        self.max_elements = max_elements
        self._unit = {name: F.normalize(t.detach().float(), dim=-1) for name, t in vectors.items()}

    def unit_vectors(self, group: str, device: torch.device) -> Tensor:
        """The group's unit vectors on ``device`` (moved there once, then kept)."""
        if group not in self._unit:
            raise KeyError(f"the metric path has no vectors for group {group!r}")
        if self._unit[group].device != device:
            self._unit[group] = self._unit[group].to(device)
        return self._unit[group]

    def _row_chunks(self, rows: int, width: int) -> Iterator[slice]:
        step = max(1, self.max_elements // width)
        return (slice(i, min(i + step, rows)) for i in range(0, rows, step))

    def sample(
        self,
        x1: Tensor,
        t: Tensor,
        response_mask: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``x_t ~ p_t(. | x1)`` at the response positions; the rest stays ``x1``.

        ``x1``: Long[B, L] unified ids; ``t``: Float[B]; ``response_mask``: Bool[B, L].
        ``t = 0`` gives the uniform source over each position's group.
        """
        beta = self.scheduler.beta(t.to(x1.device)).reshape(-1, 1).expand(x1.shape)
        uniforms = torch.rand(x1.shape, generator=generator, device=x1.device)
        group = self.groups.group_of(x1)
        xt = x1.clone()
        for index, name in enumerate(self.groups.names):
            where = response_mask & (group == index)
            if not bool(where.any()):
                continue
            start = self.groups.start[name]
            xt[where] = start + self._draw(name, x1[where] - start, beta[where], uniforms[where])
        return xt

    def _draw(self, group: str, x1: Tensor, beta: Tensor, uniforms: Tensor) -> Tensor:
        unit = self.unit_vectors(group, x1.device)
        out = torch.empty_like(x1)
        for rows in self._row_chunks(len(x1), unit.shape[0]):
            logits = -beta[rows, None] * metric_distance(unit[x1[rows]], unit)
            out[rows] = inverse_cdf(torch.softmax(logits, dim=-1), uniforms[rows])
        return out

    def loss_mask(self, xt: Tensor, x1: Tensor, response_mask: Tensor) -> Tensor:
        """Bool[B, L]: every response position."""
        return response_mask.clone()

    def local_state(self, xt: Tensor, group: str) -> Tensor:
        """Local ids of group ``group``."""
        return xt - self.groups.start[group]

    def euler_step(
        self,
        xt: Tensor,
        x1: Tensor,
        t: Tensor | float,
        h: float,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One step ``t -> t + h`` with the conditional velocity ``u_t(. | x_t, x1)``.

        ``xt``, ``x1``: Long[N] unified ids of the same group; ``t``: Float[] or Float[N].
        The velocity is linear in ``dbeta_t``, so ``h dbeta_t`` is taken as
        ``beta_{t+h} - beta_t`` (finite at ``t = 0`` where ``dbeta`` diverges for ``a < 1``):
        a position leaves ``z`` with probability ``1 - exp(-lambda)``, ``lambda = (beta_{t+h}
        - beta_t) sum_x p_t(x|x1) relu(d(z,x1) - d(x,x1))``, to ``x`` in proportion to its
        rate. A step reaching ``t = 1`` lands on ``x1`` (``p_1 = delta_{x1}``).
        """
        group = self.groups.group_of(x1)
        if not torch.equal(group, self.groups.group_of(xt)):
            raise ValueError("metric path: x_t and x1 must lie in the same head group")
        t = per_position(t, xt)
        t_next = t + h
        beta_now = self.scheduler.beta(t)
        beta_step = self.scheduler.beta(t_next) - beta_now
        leave = torch.rand(xt.shape, generator=generator, device=xt.device)
        pick = torch.rand(xt.shape, generator=generator, device=xt.device)
        out = xt.clone()
        for index, name in enumerate(self.groups.names):
            where = group == index
            if not bool(where.any()):
                continue
            start = self.groups.start[name]
            moved = self._jump(
                name,
                xt[where] - start,
                x1[where] - start,
                beta_now[where],
                beta_step[where],
                leave[where],
                pick[where],
            )
            out[where] = start + moved
        return torch.where(t_next >= 1 - END_TOL, x1, out)

    def _jump(
        self,
        group: str,
        z: Tensor,
        x1: Tensor,
        beta: Tensor,
        beta_step: Tensor,
        leave: Tensor,
        pick: Tensor,
    ) -> Tensor:
        unit = self.unit_vectors(group, z.device)
        out = z.clone()
        for rows in self._row_chunks(len(z), unit.shape[0]):
            to_x1 = metric_distance(unit[x1[rows]], unit)  # d(x, x1) for every x
            p_t = torch.softmax(-beta[rows, None] * to_x1, dim=-1)
            closer = F.relu(to_x1.gather(-1, z[rows, None]) - to_x1)  # relu(d(z,x1) - d(x,x1))
            rates = beta_step[rows, None] * p_t * closer
            jump = leave[rows] < -torch.expm1(-rates.sum(-1))
            out[rows] = torch.where(jump, inverse_cdf(rates, pick[rows]), z[rows])
        return out

    def velocity(
        self, posterior: Tensor, xt_local: Tensor, t: Tensor | float, group: str
    ) -> Tensor:
        """Exact marginal velocity ``u_t(x | z) = sum_{x1} p_{1|t}(x1|z) u_t(x | z, x1)``.

        ``posterior``: Float[N, V_g]; ``xt_local``: Long[N]; returns Float[N, V_g] with the
        diagonal ``-sum`` of the off-diagonal rates. Costs O(N V_g^2) (blocks of at most
        ``max_elements``): a reference for small vocabularies; the sampler instead draws
        ``x1 ~ p_{1|t}`` and calls :meth:`euler_step`, an unbiased estimate of the same.
        """
        unit = self.unit_vectors(group, posterior.device)
        vocab = unit.shape[0]
        t = per_position(t, xt_local)
        beta = self.scheduler.beta(t)
        x1_block = min(vocab, max(1, self.max_elements // vocab))
        u = torch.zeros(len(xt_local), vocab, device=posterior.device)
        for rows in self._row_chunks(len(xt_local), x1_block * vocab):
            z = unit[xt_local[rows]]
            for first in range(0, vocab, x1_block):
                block = slice(first, min(first + x1_block, vocab))
                to_x1 = metric_distance(unit[block], unit)  # [r, V]: d(x, x1)
                p_t = torch.softmax(-beta[rows, None, None] * to_x1, dim=-1)  # [c, r, V]
                z_to_x1 = metric_distance(z, unit[block])  # [c, r]: d(z, x1)
                flow = p_t * F.relu(z_to_x1.unsqueeze(-1) - to_x1)
                u[rows] += torch.einsum("cr,crv->cv", posterior[rows, block].float(), flow)
        u = u * self.scheduler.d_beta(t).unsqueeze(-1)
        u = u.scatter(-1, xt_local.unsqueeze(-1), 0.0)
        return u.scatter(-1, xt_local.unsqueeze(-1), -u.sum(-1, keepdim=True))
