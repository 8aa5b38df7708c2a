"""The ``pretokenize`` section of the config (light: pydantic only, no torch or Ray)."""

from __future__ import annotations

from pydantic import Field

from infra.config import Section
from tokenization.config import SequenceConfig


class PretokenizeConfig(Section):
    """The ``pretokenize`` section."""

    actors: int = Field(2, ge=1, description="actors in the pool (each loads the tokenizers)")
    cpus_per_actor: float = Field(1.0, gt=0, description="Ray CPUs per actor; torch threads")
    num_gpus: float = Field(1.0, ge=0, description="GPUs per actor when the cluster has GPUs")
    image_batch: int = Field(32, gt=0, description="images (and video frames) per encode call")
    audio_batch: int = Field(16, gt=0, description="audio clips per encode call")
    samples_per_tar: int = Field(
        2000, gt=0, description="samples per tar of a bucket (its last tar has the rest)"
    )
    pack_cpus: float = Field(0.5, gt=0, description="Ray CPUs per packing task (one per tar)")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="share of documents in 'eval'")
    sequences: SequenceConfig = Field(default_factory=SequenceConfig)
    max_restarts: int = Field(3, ge=0, description="restarts of an actor whose process died")
