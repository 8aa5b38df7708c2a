"""The ``model`` config section: backbone shape, initial weights, attention kernel, dtype.

Presets live in ``configs/model/{tiny,small,1b5,7b}.yaml`` (a registry of files, not an
``if name ==`` chain); :func:`load_model_config` reads one by name or by path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from transformers import Qwen2Config

from infra.config import Section, load

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class BackboneConfig(Section):
    """Shape of a Qwen2-family decoder (the fields a ``transformers.Qwen2Config`` needs).

    The vocabulary size is not here: it is the text + special block of the run's
    :class:`~tokenization.vocab.VocabLayout`.
    """

    hidden_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0, description="GQA: key/value heads shared by queries")
    intermediate_size: int = Field(gt=0, description="SwiGLU inner width")
    rope_theta: float = Field(1_000_000.0, gt=0)
    max_position_embeddings: int = Field(32_768, gt=0)
    tie_word_embeddings: bool = Field(False, description="LM head shares the embedding table")
    rms_norm_eps: float = Field(1e-6, gt=0)
    initializer_range: float = Field(0.02, gt=0, description="std of the random init")

    @model_validator(mode="after")
    def _heads_divide(self) -> BackboneConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("head dimension hidden_size / num_attention_heads must be even (RoPE)")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_qwen2(self, vocab_size: int) -> Qwen2Config:
        """The transformers config of this shape over ``vocab_size`` embedding rows."""
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range,
        )

    def mismatches(self, other: Qwen2Config) -> dict[str, tuple[object, object]]:
        """Fields whose value in ``other`` differs from this config: name -> (ours, theirs)."""
        theirs = {
            "hidden_size": other.hidden_size,
            "num_hidden_layers": other.num_hidden_layers,
            "num_attention_heads": other.num_attention_heads,
            "num_key_value_heads": other.num_key_value_heads,
            "intermediate_size": other.intermediate_size,
            "rope_theta": other.rope_parameters["rope_theta"],
            "tie_word_embeddings": other.tie_word_embeddings,
            "rms_norm_eps": other.rms_norm_eps,
        }
        return {k: (getattr(self, k), v) for k, v in theirs.items() if getattr(self, k) != v}


class ModelConfig(Section):
    """The DFM/AR model: backbone, where its weights start, kernels and precision."""

    preset: str = Field("custom", description="name of the preset this came from")
    backbone: BackboneConfig
    pretrained: str | None = Field(
        None,
        description="local directory of a causal LM saved by transformers save_pretrained "
        "(e.g. Qwen2.5-7B); its shape must equal `backbone`. None = random init",
    )
    attention: Literal["auto", "sdpa", "flash_attention_2"] = Field(
        "auto", description="auto = flash-attn 2 when importable, on CUDA, in bf16/fp16; else SDPA"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cpu_linear: Literal["onednn", "aten"] = Field(
        "onednn",
        description="inference on the CPU in float32: onednn = linear layers through oneDNN "
        "with weights packed once (2-4x faster at a decoding step's few rows); aten = F.linear",
    )
    projection: Literal["linear", "mlp"] = Field(
        "linear", description="map from a frozen codebook vector to the hidden size"
    )
    gradient_checkpointing: bool = Field(False, description="recompute layers in backward")
    response_positions: int = Field(
        0,
        ge=0,
        description="DFM: learned embeddings of the first N response offsets, added to the "
        "response tokens' inputs (later offsets share the last); 0 = none (rotary only)",
    )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def load_model_config(name_or_path: str | Path, overrides: tuple[str, ...] = ()) -> ModelConfig:
    """A preset by name (``tiny``, ``small``, ``1b5``, ``7b``) or a YAML file by path.

    ``overrides`` are ``key=value`` assignments inside the section (``backbone.hidden_size=128``).
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise KeyError(f"unknown model preset {name_or_path!r}; known: {known}")
    return load(ModelConfig, path, overrides)
