"""The ``tokenizers`` config section: each tokenizer's own config, plus the warm-up.

Every config model of the tokenizers lives here, beside nothing heavy: this module imports
pydantic only (no torch, transformers or decord), so the command line's help, ``omni
status`` and config validation never load a model library. The tokenizer modules import
their config from here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from infra.config import Section

SAMPLE_RATE = 16000
HOP_LENGTH = 160  # Whisper's STFT hop
MEL_FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
ENCODER_STRIDE = 2  # Whisper's conv2: 100 -> 50 frames/s
WHISPER_SOURCE_POSITIONS = 1500  # WhisperConfig's default max_source_positions (30 s windows)
# WhisperConfig keys that shape the encoder; num_mel_bins comes from ``n_mels``.
ENCODER_KEYS = frozenset(
    "d_model encoder_layers encoder_attention_heads encoder_ffn_dim encoder_layerdrop dropout"  # noqa: SIM905
    " attention_dropout activation_dropout activation_function scale_embedding init_std"
    " max_source_positions".split()
)
# 4 s windows (2 * 200 mel frames), ~100k parameters: for tests and the demo.
_TINY_ENCODER = dict(
    d_model=64,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=128,
    max_source_positions=200,
)


def check_window(max_source_positions: int, downsample: int) -> None:
    """Tokens must not straddle encoder windows: ``max_source_positions % downsample == 0``."""
    if max_source_positions % downsample:
        raise ValueError(
            f"encoder max_source_positions={max_source_positions} must be divisible "
            f"by the downsampling factor {downsample} (50 Hz / token_rate_hz)"
        )


class QuantizerConfig(Section):
    """Codebook shape and update rule."""

    codebook_size: int = Field(512, gt=1, description="codes per (sub-)codebook")
    dim: int = Field(64, gt=0, description="vector size; split into num_codebooks parts")
    num_codebooks: int = Field(1, ge=1, description="K sub-codebooks per position")
    commitment: float = Field(0.25, ge=0, description="beta of the commitment term")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="0 = codebook learned by gradient")
    dead_code_threshold: float = Field(
        0.03, ge=0, description="EMA assignments per step below which a code is restarted"
    )
    init_restarts: int = Field(
        4, ge=1, description="k-means runs when the codebook is seeded from data (best kept)"
    )

    @model_validator(mode="after")
    def _divisible(self) -> QuantizerConfig:
        if self.dim % self.num_codebooks:
            raise ValueError(f"dim={self.dim} must be divisible by num_codebooks")
        return self


class TextTokenizerConfig(Section):
    """How the text tokenizer is trained, or where a pretrained one is loaded from."""

    vocab_size: int = Field(
        4096,
        gt=0,
        description="Target BPE vocabulary size when training; the 256 byte symbols are always "
        "kept, so the real size (TextTokenizer.vocab_size) is at least 256.",
    )
    min_frequency: int = Field(
        2, ge=1, description="A pair must occur at least this often to be merged when training."
    )
    pretrained_dir: str | None = Field(
        None,
        description="Local directory holding tokenizer.json, or the tokenizer.json file itself "
        "(e.g. a Qwen2.5 tokenizer); when set it is loaded instead of training. Never a hub name.",
    )


class ImageTokenizerConfig(Section):
    """Geometry of the VQ-VAE; ``downsample`` must be ``2 ** len(channels)``."""

    resolution: int = Field(64, gt=0, description="side R of the square input, in pixels")
    downsample: int = Field(8, ge=2, description="pixels per latent cell side (power of 2)")
    channels: list[PositiveInt] = Field(
        default_factory=lambda: [32, 64, 128],
        min_length=1,
        description="conv widths, one stride-2 level each (encoder and decoder)",
    )
    latent_dim: int = Field(64, gt=0, description="latent vector size; equals quantizer.dim")
    patch_path: bool = Field(
        True,
        description="a linear path from each downsample x downsample pixel patch to its latent "
        "and back, beside the conv encoder and decoder; `initialise` sets it to the patches' PCA "
        "so training starts as a k-means block codec and the convs learn the residual",
    )
    quantizer: QuantizerConfig = Field(default_factory=QuantizerConfig)
    code_search: int = Field(
        2,
        ge=0,
        description="sweeps of analysis-by-synthesis over the ids in `encode`: each patch's "
        "code is re-chosen as the one whose decoded 3 x 3 patches are closest (squared error) "
        "to the image (tokenization.code_search); 0 = the nearest code, as a VQ-VAE. Needs the "
        "patch path; ignored without it",
    )
    min_side: int = Field(8, ge=1, description="source images with a smaller side are rejected")
    clip_init_dir: str | None = Field(
        None, description="local CLIP (vision) checkpoint whose ViT replaces the conv encoder"
    )
    clip_vision: dict[str, Any] | None = Field(
        None,
        description="CLIPVisionConfig of the CLIP encoder; filled in when built from "
        "clip_init_dir, so a saved tokenizer loads without that directory",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ImageTokenizerConfig:
        levels = len(self.channels)
        if self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample={self.downsample} must be a power of 2")
        if self.downsample != 2**levels:
            raise ValueError(
                f"downsample={self.downsample} must equal 2 ** len(channels) = {2**levels} "
                f"(channels={self.channels}: one stride-2 level per entry)"
            )
        if self.resolution % self.downsample:
            raise ValueError(
                f"resolution={self.resolution} must be divisible by downsample={self.downsample}"
            )
        if self.quantizer.dim != self.latent_dim:
            raise ValueError(
                f"quantizer.dim={self.quantizer.dim} must equal latent_dim={self.latent_dim}"
            )
        return self


class ImageTrainerConfig(Section):
    """Optimiser, loss weights and the auxiliary networks of the warm-up."""

    lr: float = Field(2e-4, gt=0, description="Adam learning rate (generator and discriminator)")
    betas: tuple[float, float] = Field((0.5, 0.9), description="Adam betas (VQGAN's)")
    grad_clip: float = Field(1.0, gt=0, description="max gradient norm per optimiser step")
    warmup_steps: int = Field(20, ge=0, description="steps of linear learning-rate warm-up")
    min_lr_ratio: float = Field(
        0.05, ge=0, le=1, description="learning rate at the end of the cosine, as a share of lr"
    )
    flip: bool = Field(True, description="augment: mirror half the training images")
    max_shift: int = Field(
        7, ge=0, description="augment: translate by up to this many pixels (reflect padding)"
    )
    source_scale: int = Field(
        2,
        ge=1,
        description="augment: training images are kept at this many times the resolution "
        "(memory: its square) and each step cuts a random square crop from them, resized "
        "down (1 = no crops)",
    )
    min_crop: float = Field(
        0.5, gt=0, le=1, description="augment: smallest crop side, as a share of the kept image's"
    )
    l1_weight: float = Field(1.0, ge=0, description="weight of |x - x_hat|_1 in L_R")
    l2_weight: float = Field(1.0, ge=0, description="weight of |x - x_hat|^2 in L_R")
    gan_start_step: int = Field(
        2000, ge=0, description="L_G and D training are on from this (0-based) step"
    )
    gan_weight: float = Field(
        0.1,
        ge=0,
        description="lambda_G, weight of the generator loss (times the balance "
        "below when gan_adaptive)",
    )
    gan_adaptive: bool = Field(
        True,
        description="scale lambda_G by |grad L_R| / |grad L_G| at the decoder's output layer "
        "(VQGAN's adaptive weight)",
    )
    disc_width: int = Field(32, gt=0, description="first conv width of the PatchGAN")
    disc_layers: int = Field(3, ge=1, description="stride-2 convs of the PatchGAN")
    semantic_weight: float = Field(0.1, ge=0, description="lambda_sem, weight of L_constra")
    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature tau")
    text_vocab_size: int = Field(4096, gt=0, description="caption BPE vocabulary size")
    text_width: int = Field(128, gt=0, description="caption encoder width")
    text_layers: int = Field(2, ge=1, description="caption encoder transformer layers")
    text_heads: int = Field(4, ge=1, description="caption encoder attention heads")
    max_caption_tokens: int = Field(77, gt=0, description="captions are truncated to this")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ImageTrainerConfig:
        if self.text_width % self.text_heads:
            raise ValueError(
                f"text_width={self.text_width} must be divisible by text_heads={self.text_heads}"
            )
        return self


class AudioTokenizerConfig(Section):
    """Front-end, encoder, downsampling, codebook and decoder of the audio tokenizer."""

    sample_rate: Literal[16000] = Field(
        16000, description="rate audio is resampled to; Whisper's log-mel is defined at 16 kHz"
    )
    n_mels: Literal[80, 128] = Field(80, description="mel bins (Whisper large-v3 uses 128)")
    token_rate_hz: float = Field(
        12.5, gt=0, le=50, description="token positions per second; 50 / rate must be an integer"
    )
    encoder_dir: str | None = Field(
        None, description="local Whisper checkpoint (WhisperModel dir); None = random tiny encoder"
    )
    encoder: dict[str, Any] = Field(
        default_factory=lambda: dict(_TINY_ENCODER),
        description="WhisperConfig overrides (ENCODER_KEYS) used when encoder_dir is None",
    )
    latent_dim: int = Field(128, gt=0, description="channels of the strided downsampling conv")
    quantizer: QuantizerConfig = Field(default_factory=QuantizerConfig)
    decoder_channels: int = Field(
        128, ge=2, description="mel decoder width at token rate (half of it at frame rate)"
    )
    decoder_blocks: int = Field(2, ge=0, description="dilated residual conv blocks per rate")
    patch_path: bool = Field(
        True,
        description="a linear path from each token's span of mel frames to its latent and back, "
        "beside the Whisper encoder and the conv decoder; `initialise` sets it to the spans' PCA "
        "so training starts as a k-means codec of mel spans and the networks learn the residual",
    )
    code_search: int = Field(
        2,
        ge=0,
        description="sweeps of analysis-by-synthesis over the ids when encoding (not in "
        "training): each token's code is re-chosen as the one whose decoded spans are closest "
        "(L1) to the clip's log-mel (tokenization.code_search); 0 = the nearest code, as a "
        "VQ-VAE. Needs the span path; ignored without it",
    )
    min_seconds: float = Field(
        0.1, ge=0.025, description="shorter clips are rejected (0.025 s = one 400-sample FFT)"
    )
    silence_rms: float = Field(
        1e-4, ge=0, description="clips whose RMS (full scale = 1) is below this are rejected"
    )

    @property
    def downsample(self) -> int:
        """Encoder frames (50 Hz) per token position."""
        return round(MEL_FRAMES_PER_SECOND / ENCODER_STRIDE / self.token_rate_hz)

    @property
    def span(self) -> int:
        """Mel frames (100 Hz) per token position."""
        return ENCODER_STRIDE * self.downsample

    @model_validator(mode="after")
    def _consistent(self) -> AudioTokenizerConfig:
        ratio = MEL_FRAMES_PER_SECOND / ENCODER_STRIDE / self.token_rate_hz
        if abs(ratio - round(ratio)) > 1e-9:
            raise ValueError(f"token_rate_hz={self.token_rate_hz}: 50 / rate must be an integer")
        unknown = set(self.encoder) - ENCODER_KEYS
        if unknown:
            raise ValueError(
                f"encoder: unknown keys {sorted(unknown)}; allowed {sorted(ENCODER_KEYS)}"
            )
        if self.encoder_dir is None:
            # The values' types are checked by WhisperConfig when the encoder is built
            # (tokenization.audio): building one here would import transformers.
            positions = self.encoder.get("max_source_positions", WHISPER_SOURCE_POSITIONS)
            check_window(positions, self.downsample)
        elif self.encoder and "encoder" in self.model_fields_set:
            raise ValueError("encoder overrides and encoder_dir are exclusive: the dir sets it")
        return self


class AudioTrainerConfig(Section):
    """Optimiser, loss weights and caption decoder of the audio tokenizer warm-up."""

    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate of the tokenizer")
    caption_learning_rate: float | None = Field(
        None,
        gt=0,
        description="AdamW learning rate of the caption decoder, trained from scratch while "
        "the tokenizer starts fitted (None = learning_rate)",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    warmup_steps: int = Field(20, ge=0, description="steps of linear learning-rate warm-up")
    min_lr_ratio: float = Field(
        0.05, ge=0, le=1, description="learning rate at the end of the cosine, as a share"
    )
    max_shift: int = Field(
        8,
        ge=0,
        description="augment: drop up to this many leading mel frames (moves the "
        "token grid; 8 = one token span)",
    )
    max_gain: float = Field(
        0.25,
        ge=0,
        description="augment: add a uniform offset in +-this to the log-mel "
        "(0.25 = +-10 dB in Whisper's scale)",
    )
    max_bin_shift: int = Field(
        3, ge=0, description="augment: shift the spectrum by up to this many mel bins"
    )
    max_stretch: float = Field(
        0.2, ge=0, lt=1, description="augment: resample time by a factor in 1 +- this"
    )
    reconstruction_weight: float = Field(1.0, ge=0, description="w_R of the mel L1")
    caption_weight: float = Field(0.5, ge=0, description="w_cap of the caption cross-entropy")
    text_vocab_size: int = Field(
        32000, gt=0, description="transcript ids are in [0, text_vocab_size) (the BPE vocab)"
    )
    caption_dim: int = Field(128, gt=0, description="caption decoder width")
    caption_layers: int = Field(2, ge=1, description="caption decoder layers")
    caption_heads: int = Field(4, ge=1, description="caption decoder attention heads")


class VideoConfig(Section):
    """How many frames stand for one clip."""

    frames: int = Field(
        8, ge=1, description="frames sampled uniformly over each clip (the paper uses 8)"
    )


class SequenceConfig(Section):
    """How documents become bucketed sequences."""

    both_directions: bool = Field(
        True, description="a media+caption document gives X2text and text2X samples"
    )
    max_tokens: int | None = Field(None, gt=0, description="longer sequences are not built")


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
