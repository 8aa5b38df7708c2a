"""Discrete flow matching math: head groups, schedules, probability paths, losses.

Split the way the math is (after facebookresearch/flow_matching): ``groups`` (which head
predicts which ids), ``schedulers`` (kappa_t, beta_t), ``mixture_paths`` (masked, uniform),
``metric_path`` (FUDOKI), ``losses`` (L_ce, generalized KL), ``config`` (``PathConfig`` and
``build_path``). Paths own their scheduler, so training and sampling cannot drift apart.
Every path works on unified ids and corrupts only the response positions.
"""

from training.dfm.config import PATHS, SCHEDULERS, PathConfig, ProbPath, build_path
from training.dfm.groups import VocabGroups
from training.dfm.losses import cross_entropy_sum, generalized_kl_sum
from training.dfm.metric_path import MetricPath, inverse_cdf, metric_distance
from training.dfm.mixture_paths import MaskedPath, MixturePath, UniformPath
from training.dfm.schedulers import (
    CosineScheduler,
    MetricScheduler,
    MixtureScheduler,
    PolynomialScheduler,
)

__all__ = [
    "PATHS",
    "SCHEDULERS",
    "CosineScheduler",
    "MaskedPath",
    "MetricPath",
    "MetricScheduler",
    "MixturePath",
    "MixtureScheduler",
    "PathConfig",
    "PolynomialScheduler",
    "ProbPath",
    "UniformPath",
    "VocabGroups",
    "build_path",
    "cross_entropy_sum",
    "generalized_kl_sum",
    "inverse_cdf",
    "metric_distance",
]
