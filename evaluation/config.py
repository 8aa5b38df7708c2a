"""The ``eval:`` section: named suites (which tasks, how many samples, sampler settings)
and the sweep's retry and lease settings.

The defaults evaluate ``tiny`` on the demo corpus in seconds per checkpoint on CPU: few
samples, few sampler steps, greedy predictions so that two evaluations of one checkpoint
agree. A suite named in ``suites`` replaces nothing else: ``default`` is always there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from infra.config import Section
from training.config import CacheConfig, SamplerConfig

TASK_NAMES = ("retrieval", "understanding", "generation", "speed")


def quick_sampler() -> SamplerConfig:
    """Greedy confidence unmasking, text canvases of 32 or 64 positions: blocks of 32
    unmasked left to right, every position of the block above confidence 0.3 committed at
    each step (at least one), the active (Fast-dLLM) cache.

    The fastest setting that ``benchmarks/sampler_quality.py`` found no worse than one
    token per step without a cache, beyond that reference's seed-to-seed spread, on each of
    two ``tiny`` checkpoints trained 1000 steps on the demo corpus (seeds 0 and 1; 2.6x the
    reference's tokens/s). Its image PSNR sits about 0.5 dB below the reference's on both,
    inside the spread; a threshold of 0.5 (2.1x) does not lose it. A fixed budget of 4
    tokens a step in the same blocks (7x; the default before) cost text -> audio mel-L1
    beyond the spread on both, and 2, 8 and 16 a step and the adaptive cache over the whole
    canvas (the paper's setting) on at least one (README, "Sampler defaults").
    """
    return SamplerConfig(
        tau=0.3,
        decode_block=32,
        cache=CacheConfig(strategy="active"),
        temperature=0.0,
        block_size=32,
        max_length=64,
    )


class SuiteConfig(Section):
    """One evaluation suite: tasks, data, sampler and where it runs."""

    tasks: list[str] = Field(
        default_factory=lambda: list(TASK_NAMES), description=f"subset of {TASK_NAMES}"
    )
    samples: int = Field(8, gt=0, description="eval samples per task and bucket (the first N)")
    split: Literal["eval", "train", "all"] = Field(
        "eval", description="which token samples: the eval split (default), train, or all"
    )
    sampler: SamplerConfig = Field(
        default_factory=quick_sampler, description="DGS, confidence/Euler steps, cache"
    )
    dgs: bool = Field(
        True, description="dynamic length for text; false = one canvas of sampler.max_length"
    )
    batch_size: int = Field(8, gt=0, description="sequences per forward pass")
    artifacts: int = Field(2, ge=0, description="decoded samples saved per task (PNG, WAV)")
    seed: int = Field(0, description="corruption (NLL) and sampling draws")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if present")
    cpu_threads: int = Field(
        1, gt=0, description="torch threads on CPU; small models run fastest on one"
    )

    @field_validator("tasks")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(TASK_NAMES))
        if unknown or not value:
            raise ValueError(f"unknown tasks {unknown}; choose from {list(TASK_NAMES)}")
        return value


class SweepSettings(Section):
    """How ``omni sweep`` retries and how long a claim holds without a heartbeat."""

    suite: str = Field("default", description="the suite a sweep evaluates")
    max_attempts: int = Field(3, ge=1, description="tries per checkpoint before it is failed")
    lease_s: float = Field(
        300.0, gt=0, description="a claim not renewed for this long is taken over"
    )


class EvalConfig(Section):
    """The ``eval`` section: named suites and the sweep's settings."""

    suites: dict[str, SuiteConfig] = Field(
        default_factory=lambda: {"default": SuiteConfig()},
        description="name -> suite; 'default' is added when missing",
    )
    sweep: SweepSettings = Field(default_factory=SweepSettings)

    @model_validator(mode="after")
    def _default_suite(self) -> EvalConfig:
        self.suites.setdefault("default", SuiteConfig())
        if self.sweep.suite not in self.suites:
            raise ValueError(
                f"sweep.suite {self.sweep.suite!r} is not one of {sorted(self.suites)}"
            )
        return self

    def suite(self, name: str | None) -> SuiteConfig:
        """The suite ``name`` (``default`` when None); KeyError naming the known ones."""
        key = name or "default"
        if key not in self.suites:
            raise KeyError(f"unknown suite {key!r}; the config has {sorted(self.suites)}")
        return self.suites[key]
