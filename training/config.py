"""The light config models of training: the DFM probability path (the ``model.path``
section) and the samplers with their feature cache (the ``sampler`` of every ``eval``
suite).

They live apart from the code that reads them (``training.dfm``, ``training.sampling``),
which imports them from here, because that code imports torch: this module imports
pydantic only, so the command line's help, ``omni status`` and config validation never
load torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from infra.config import Section

DEFAULT_MAX_ELEMENTS = 1 << 24  # 64 MiB of float32 per (positions x V) block


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


class CacheConfig(Section):
    """Feature caching during denoising.

    The instruction's keys/values are computed once (the instruction never attends to the
    response, so they are exact). The response is recomputed fully every
    ``full_refresh_every`` steps; in between, ``strategy``:

    * ``adaptive`` (dLLM-Cache, arXiv 2506.06295): each layer recomputes only the positions
      whose value vectors moved most (lowest cosine similarity to the cached ones): the
      ``refresh_ratio`` fraction, or all below ``refresh_threshold`` (at least one).
    * ``active`` (the dual cache of Fast-dLLM, arXiv 2505.22618): every layer recomputes
      only the positions whose logits are asked for and those whose token changed since the
      last step; every other position keeps its cached keys/values. With
      ``SamplerConfig.decode_block`` that is the current block (plus the tokens just
      committed): the rest of the canvas, future ``<MASK>`` positions included, is cached.
      ``refresh_ratio`` / ``refresh_threshold`` are then unused. ``compile`` runs those
      steps compiled: the positions a step recomputes are padded (with the leftmost
      others) to the next power of two, so a generation compiles a handful of shapes once
      and replays them (on CUDA as CUDA graphs, where an eager step is launch-bound).
    """

    enabled: bool = Field(True, description="False: full forward of instruction + response")
    refresh_ratio: float | None = Field(0.25, gt=0, le=1, description="fraction recomputed")
    refresh_threshold: float | None = Field(
        None, ge=-1, le=1, description="recompute positions with value cosine below this"
    )
    full_refresh_every: int = Field(8, ge=1, description="full response refresh period, steps")
    strategy: Literal["adaptive", "active"] = Field(
        "adaptive",
        description="between full refreshes, recompute by value cosine (adaptive, dLLM-Cache) "
        "or only the positions predicted and those whose token changed (active, Fast-dLLM)",
    )
    compile: bool = Field(
        False,
        description="active: run the partial steps through torch.compile (a CUDA graph on "
        "CUDA), their position count padded up to a power of two so few shapes compile",
    )

    @model_validator(mode="after")
    def _one_rule(self) -> CacheConfig:
        if (self.refresh_ratio is None) == (self.refresh_threshold is None):
            raise ValueError("set exactly one of refresh_ratio and refresh_threshold")
        return self


class SamplerConfig(Section):
    """How responses are generated; see the module docstring for each method."""

    method: Literal["confidence", "euler"] = Field(
        "confidence", description="confidence unmasking (masked path) or Euler CTMC (any path)"
    )
    steps: int = Field(64, ge=1, description="Euler steps, or unmasking rounds per canvas")
    tokens_per_step: int | None = Field(
        None, ge=1, description="confidence: commit this many per step (overrides steps)"
    )
    tau: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="confidence: commit all above tau, at least one (with tokens_per_step: "
        "at least that many, the most confident)",
    )
    temperature: float = Field(
        1.0, ge=0, description="posterior temperature; 0 = argmax (greedy) predictions"
    )
    decode_block: int | None = Field(
        None,
        ge=1,
        description="confidence: semi-autoregressive blocks of this many positions, "
        "unmasked left to right (None: the whole canvas at once)",
    )
    block_size: int = Field(32, ge=1, description="DGS block; training pads to a multiple")
    eos_threshold: float = Field(0.5, gt=0, le=1, description="DGS: stop growing at this")
    max_length: int = Field(512, ge=1, description="DGS: longest text canvas, positions")
    cache: CacheConfig = Field(default_factory=CacheConfig)

    @model_validator(mode="after")
    def _consistent(self) -> SamplerConfig:
        if self.max_length % self.block_size:
            raise ValueError(f"max_length must be a multiple of block_size {self.block_size}")
        return self
