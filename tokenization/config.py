"""The ``tokenizers`` config section: each tokenizer's own config, plus the warm-up."""

from __future__ import annotations

from pydantic import Field

from infra.config import Section
from tokenization.audio import AudioTokenizerConfig
from tokenization.audio_trainer import AudioTrainerConfig
from tokenization.image import ImageTokenizerConfig
from tokenization.image_trainer import ImageTrainerConfig
from tokenization.text import TextTokenizerConfig
from tokenization.video import VideoConfig


class WarmupConfig(Section):
    """Budget and data split of the tokenizer warm-up (``omni tokenizers train``)."""

    device: str = Field("auto", description="auto = cuda when available, else cpu")
    image_steps: int = Field(300, ge=0, description="optimiser steps of the image tokenizer")
    image_batch: int = Field(16, gt=0)
    audio_steps: int = Field(200, ge=0, description="optimiser steps of the audio tokenizer")
    audio_batch: int = Field(8, gt=0)
    eval_fraction: float = Field(
        0.2, ge=0, lt=1, description="media held out (by content hash) to measure quality"
    )
    max_initialise_media: int = Field(
        1024,
        gt=0,
        description="distinct images and clips (each) the data-driven start is fitted on "
        "(PCA, k-means, least squares: the cost grows with them, the fit barely)",
    )
    max_eval_media: int = Field(
        256, gt=0, description="held-out images and clips (each) the quality is measured on"
    )
    max_seconds: float = Field(0, ge=0, description="stop training after this; 0 = no limit")
    log_every: int = Field(10, gt=0, description="steps between logged metrics")
    seed: int = 0


class TokenizersConfig(Section):
    """Every tokenizer's architecture and training settings."""

    text: TextTokenizerConfig = Field(default_factory=TextTokenizerConfig)
    image: ImageTokenizerConfig = Field(default_factory=ImageTokenizerConfig)
    audio: AudioTokenizerConfig = Field(default_factory=AudioTokenizerConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    image_trainer: ImageTrainerConfig = Field(default_factory=ImageTrainerConfig)
    audio_trainer: AudioTrainerConfig = Field(default_factory=AudioTrainerConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
