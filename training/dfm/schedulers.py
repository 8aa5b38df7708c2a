"""Time schedules of the probability paths; ``t = 0`` is pure noise, ``t = 1`` is data.

Mixture paths (Gat et al., "Discrete Flow Matching", arXiv 2407.15595) move a token
to its clean value with probability ``kappa_t``, ``kappa_0 = 0``, ``kappa_1 = 1``:

    polynomial   kappa_t = t^n               dkappa_t = n t^(n-1)       (n = 1: linear, CondOT)
    cosine       kappa_t = 1 - cos(pi t / 2)  dkappa_t = (pi / 2) sin(pi t / 2)

and jump to it at the rate ``dkappa_t / (1 - kappa_t)`` (:meth:`MixtureScheduler.jump_rate`).

The metric-induced path (FUDOKI, arXiv 2505.20147) sharpens a softmax over
distances with the inverse temperature ``beta_0 = 0`` (uniform) to ``beta_1 = inf`` (clean):

    beta_t  = c (t / (1 - t))^a
    dbeta_t = c a (t / (1 - t))^(a - 1) / (1 - t)^2        (FUDOKI: c = 3, a = 0.9)

Both ``jump_rate`` and ``beta`` diverge at ``t = 1`` and ``dbeta`` at ``t = 0`` when
``a < 1``: they evaluate at ``t`` clamped to ``[T_EPS, 1 - T_EPS]``, so they stay finite.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

T_EPS = 1e-4  # distance from 0 and 1 at which the divergent rates are evaluated


class MixtureScheduler(ABC):
    """A ``kappa_t`` schedule: subclasses give :meth:`kappa` and :meth:`d_kappa`."""

    @abstractmethod
    def kappa(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def d_kappa(self, t: Tensor) -> Tensor: ...

    def jump_rate(self, t: Tensor) -> Tensor:
        """``dkappa_t / (1 - kappa_t)``: the rate of jumping to ``x1`` of a mixture path."""
        t = torch.as_tensor(t, dtype=torch.float32).clamp(T_EPS, 1 - T_EPS)
        return self.d_kappa(t) / (1 - self.kappa(t))


class PolynomialScheduler(MixtureScheduler):
    """``kappa_t = t^n``; ``n = 1`` is the linear (CondOT) schedule."""

    def __init__(self, n: float = 1.0) -> None:
        if n <= 0:
            raise ValueError(f"polynomial exponent must be positive, got {n}")
        self.n = n

    def kappa(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float32) ** self.n

    def d_kappa(self, t: Tensor) -> Tensor:
        return self.n * torch.as_tensor(t, dtype=torch.float32) ** (self.n - 1)


class CosineScheduler(MixtureScheduler):
    """``kappa_t = 1 - cos(pi t / 2)``: slow start, fast finish."""

    def kappa(self, t: Tensor) -> Tensor:
        return 1 - torch.cos(torch.as_tensor(t, dtype=torch.float32) * (math.pi / 2))

    def d_kappa(self, t: Tensor) -> Tensor:
        return (math.pi / 2) * torch.sin(torch.as_tensor(t, dtype=torch.float32) * (math.pi / 2))


class MetricScheduler:
    """Inverse temperature ``beta_t = c (t / (1 - t))^a`` of the metric-induced path."""

    def __init__(self, c: float = 3.0, a: float = 0.9) -> None:
        if c <= 0 or a <= 0:
            raise ValueError(f"metric schedule needs c > 0 and a > 0, got c={c}, a={a}")
        self.c, self.a = c, a

    def beta(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).clamp(0, 1 - T_EPS)
        return self.c * (t / (1 - t)) ** self.a

    def d_beta(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).clamp(T_EPS, 1 - T_EPS)
        return self.c * self.a * (t / (1 - t)) ** (self.a - 1) / (1 - t) ** 2
