"""The ``model:`` and ``train:`` sections of the pipeline config.

``model`` says which network is trained (a preset or a model YAML, optional local weights,
the probability path, the objective); ``train`` says how (batching, optimiser, schedule,
checkpoints, workers). Batch and precision fields of the DeepSpeed JSON are filled from
here (``training.deepspeed_config``), so the two can never disagree.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from infra.config import Section
from training.config import PathConfig

LOSS_TERMS = ("ce", "rec_image", "rec_audio")  # the terms GradNorm balances
# Every term the trainer sums, counts and logs: the balanced ones and the <EOS> alignment
# (training/alignment.py), which takes its fixed train.alignment_weight instead.
WINDOW_TERMS = (*LOSS_TERMS, "align")


class ModelSection(Section):
    """The ``model`` section: which network, from which weights, trained with which path."""

    size: str = Field(
        "tiny", description="preset (tiny, small, 1b5, 7b) or the path of a model YAML"
    )
    pretrained: str | None = Field(
        None,
        description="local save_pretrained folder of a Qwen2-family LM (safetensors only); "
        "null = random init from the preset",
    )
    path: PathConfig = Field(
        default_factory=PathConfig, description="the DFM probability path, scheduler, loss"
    )
    objective: Literal["dfm", "ar"] = Field(
        "dfm", description="dfm (discrete flow matching) or ar (the causal baseline)"
    )
    gradient_checkpointing: bool = Field(False, description="recompute layers in backward")


class TrainConfig(Section):
    """The ``train`` section: batching, optimiser, schedule, checkpoints and workers."""

    max_steps: int = Field(200, gt=0, description="optimizer steps of the whole run")
    micro_batch_size: int = Field(4, gt=0, description="sequences per micro-batch per worker")
    grad_accum: int = Field(4, gt=0, description="micro-batches per optimizer step per worker")
    bucket_weights: dict[str, float] = Field(
        default_factory=dict,
        description="bucket -> share of micro-batches; {} = every bucket with train data, equally",
    )
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up from 0 to lr")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay after warm-up, to min_lr_ratio * lr at max_steps"
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr / peak lr")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay (not on norms and biases)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clipping; 0 = off")
    checkpoint_every: int = Field(50, gt=0, description="save every N optimizer steps (and last)")
    keep_last: int = Field(3, gt=0, description="complete checkpoints kept per run")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (data-parallel ranks)")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs per worker; torch threads")
    max_failures: int = Field(
        3,
        ge=-1,
        description="restarts of the workers after a lost worker or node, each from the "
        "latest complete checkpoint; 0 = none, -1 = unlimited",
    )
    resources_timeout_s: float = Field(
        600.0,
        ge=0,
        description="wait this long for the Ray cluster to offer the workers' CPUs/GPUs "
        "(an autoscaler adding nodes) before failing",
    )
    use_gpu: bool = Field(False, description="one GPU per worker, bf16, NCCL; false = CPU, fp32")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    cpu_offload: bool = Field(False, description="ZeRO-3 with parameters and optimizer on CPU")
    deepspeed_template: str | None = Field(
        None, description="DeepSpeed JSON to start from; null = infra/deploy/deepspeed/ by stage"
    )
    seed: int = Field(0, description="weights, data order and corruption all derive from it")
    dgs_block: int = Field(32, gt=0, description="responses padded with <PAD> to a multiple")
    max_length: int = Field(2048, gt=0, description="longer sequences are skipped and counted")
    loss_weighting: Literal["gradnorm", "fixed"] = Field(
        "gradnorm", description="GradNorm (Chen et al. 2018) or the fixed loss_weights"
    )
    gradnorm_alpha: float = Field(1.5, ge=0, description="GradNorm's restoring-force alpha")
    gradnorm_lr: float = Field(0.025, gt=0, description="step size of the GradNorm weights")
    loss_weights: dict[str, float] = Field(
        default_factory=lambda: {"ce": 1.0, "rec_image": 1.0, "rec_audio": 1.0},
        description="lambda1..3 of L_ce, L_rec^V, L_rec^A (GradNorm's start when gradnorm)",
    )
    alignment_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the <EOS> InfoNCE between each X2text pair's medium and text "
        "(cross-modal retrieval, training/alignment.py); 0 = off",
    )
    alignment_temperature: float = Field(
        0.07, gt=0, description="temperature of the <EOS> InfoNCE (CLIP's start)"
    )
    log_every: int = Field(1, gt=0, description="optimizer steps per MLflow metrics batch")
    eval_every: int = Field(
        100, ge=0, description="held-out loss (val/*) on the eval split every N steps; 0 = off"
    )
    eval_samples: int = Field(
        64, gt=0, description="eval-split samples per bucket in the held-out loss"
    )
    prefetch: int = Field(4, ge=1, description="micro-batches read ahead per worker")

    @field_validator("loss_weights")
    @classmethod
    def _known_terms(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}; known: {list(LOSS_TERMS)}")
        negative = sorted(k for k, v in value.items() if v < 0)
        if negative:
            raise ValueError(f"loss weights must be >= 0: {negative}")
        return {term: float(value.get(term, 1.0)) for term in LOSS_TERMS}

    @field_validator("bucket_weights")
    @classmethod
    def _positive_weights(cls, value: dict[str, float]) -> dict[str, float]:
        bad = sorted(k for k, v in value.items() if not v > 0)
        if bad:
            raise ValueError(f"bucket weights must be > 0: {bad}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.cpu_offload and self.zero_stage != 3:
            raise ValueError("cpu_offload needs zero_stage 3")
        if self.warmup_steps >= self.max_steps and self.lr_schedule != "constant":
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < max_steps")
        return self

    def global_batch(self) -> int:
        """Sequences per optimizer step over all workers."""
        return self.micro_batch_size * self.grad_accum * self.num_workers
