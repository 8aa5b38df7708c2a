"""The path section of the config and the factory that builds a probability path from it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import Field, model_validator
from torch import Tensor

from infra.config import Section
from tokenization.vocab import VocabLayout
from training.dfm.groups import VocabGroups
from training.dfm.metric_path import DEFAULT_MAX_ELEMENTS, MetricPath
from training.dfm.mixture_paths import MaskedPath, UniformPath
from training.dfm.schedulers import (
    CosineScheduler,
    MetricScheduler,
    MixtureScheduler,
    PolynomialScheduler,
)

ProbPath = MaskedPath | UniformPath | MetricPath


class PathConfig(Section):
    """Which probability path corrupts the responses, its schedule, and the loss."""

    path: Literal["masked", "uniform", "metric"] = Field(
        "masked", description="masked / uniform mixture, or FUDOKI's metric-induced path"
    )
    scheduler: Literal["polynomial", "cosine", "metric"] = Field(
        "polynomial", description="kappa_t = t^n or 1 - cos(pi t/2); metric: beta_t"
    )
    exponent: float = Field(1.0, gt=0, description="n of kappa_t = t^n (1 = linear)")
    c: float = Field(3.0, gt=0, description="metric: beta_t = c (t/(1-t))^a")
    a: float = Field(0.9, gt=0, description="metric: beta_t = c (t/(1-t))^a")
    loss: Literal["cross_entropy", "generalized_kl"] = Field(
        "cross_entropy", description="L_ce, or the generalized KL (mixture paths only)"
    )
    max_elements: int = Field(
        DEFAULT_MAX_ELEMENTS, ge=1, description="metric: entries per (positions x V) block"
    )

    @model_validator(mode="after")
    def _consistent(self) -> PathConfig:
        if (self.path == "metric") != (self.scheduler == "metric"):
            raise ValueError("the metric path takes the metric scheduler, and only it")
        if self.loss == "generalized_kl" and self.path == "metric":
            raise ValueError("the generalized KL loss is defined for mixture paths only")
        return self


SCHEDULERS: dict[str, Callable[[PathConfig], MixtureScheduler | MetricScheduler]] = {
    "polynomial": lambda cfg: PolynomialScheduler(cfg.exponent),
    "cosine": lambda cfg: CosineScheduler(),
    "metric": lambda cfg: MetricScheduler(cfg.c, cfg.a),
}


def _masked(cfg: PathConfig, layout: VocabLayout, vectors: dict[str, Tensor] | None) -> ProbPath:
    groups = VocabGroups.from_layout(layout)
    return MaskedPath(SCHEDULERS[cfg.scheduler](cfg), groups, layout.special_id("<MASK>"))


def _uniform(cfg: PathConfig, layout: VocabLayout, vectors: dict[str, Tensor] | None) -> ProbPath:
    return UniformPath(SCHEDULERS[cfg.scheduler](cfg), VocabGroups.from_layout(layout))


def _metric(cfg: PathConfig, layout: VocabLayout, vectors: dict[str, Tensor] | None) -> ProbPath:
    if not vectors:
        raise ValueError("the metric path needs vectors per head group (codebooks, embeddings)")
    groups = VocabGroups.from_layout(layout)
    return MetricPath(SCHEDULERS[cfg.scheduler](cfg), groups, vectors, cfg.max_elements)


PATHS: dict[str, Callable[[PathConfig, VocabLayout, dict[str, Tensor] | None], ProbPath]] = {
    "masked": _masked,
    "uniform": _uniform,
    "metric": _metric,
}


def build_path(
    config: PathConfig, layout: VocabLayout, vectors: dict[str, Tensor] | None = None
) -> ProbPath:
    """The probability path ``config`` names, over ``layout``'s head groups.

    ``vectors`` (metric path only): ``{group: Float[size[group], D]}``, e.g. the image and
    audio codebooks and the text embedding table.
    """
    return PATHS[config.path](config, layout, vectors)
