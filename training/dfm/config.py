"""The factory that builds a probability path from the ``model.path`` section
(:class:`training.config.PathConfig`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from tokenization.vocab import VocabLayout
from training.config import PathConfig
from training.dfm.groups import VocabGroups
from training.dfm.metric_path import MetricPath
from training.dfm.mixture_paths import MaskedPath, UniformPath
from training.dfm.schedulers import (
    CosineScheduler,
    MetricScheduler,
    MixtureScheduler,
    PolynomialScheduler,
)

ProbPath = MaskedPath | UniformPath | MetricPath


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
