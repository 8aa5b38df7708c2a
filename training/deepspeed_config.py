"""The DeepSpeed JSON of a run: a template from ``infra/deploy/deepspeed/``, filled from ``train``.

Templates mark the fields the training config owns with ``"auto"`` (micro-batch, gradient
accumulation, global batch, clipping, bf16, ZeRO stage). Filling them here means the two
can never disagree; a template that sets one of them to a different value is refused, with
the field and the ``train.*`` key named.

On a single rank without offload, ZeRO runs at stage 0 whatever ``train.zero_stage`` says:
partitioning over one rank saves nothing and costs gradient copies every step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import infra
from training.train_config import TrainConfig

TEMPLATE_DIR = Path(infra.__file__).parent / "deploy" / "deepspeed"


def template_path(train: TrainConfig) -> Path:
    """The template ``train`` asks for: explicit, else by ZeRO stage and offload."""
    if train.deepspeed_template:
        return Path(train.deepspeed_template)
    if train.zero_stage == 3:
        return TEMPLATE_DIR / ("zero3_offload.json" if train.cpu_offload else "zero3.json")
    return TEMPLATE_DIR / "zero2.json"


def _fill(config: dict[str, Any], dotted: str, value: Any, owner: str, source: Path) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    current = node.get(leaf, "auto")
    if current != "auto" and current != value:
        raise ValueError(
            f"{source}: {dotted} is {current!r} but {owner} says {value!r}; "
            f'set it to "auto" in the template or change {owner}'
        )
    node[leaf] = value


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The filled DeepSpeed config for ``world_size`` data-parallel ranks."""
    source = template_path(train)
    if not source.is_file():
        raise FileNotFoundError(f"train.deepspeed_template: no such file: {source}")
    config = json.loads(source.read_text())
    _fill(config, "train_micro_batch_size_per_gpu", train.micro_batch_size,
          "train.micro_batch_size", source)  # fmt: skip
    _fill(config, "gradient_accumulation_steps", train.grad_accum, "train.grad_accum", source)
    _fill(config, "train_batch_size", train.micro_batch_size * train.grad_accum * world_size,
          "train.micro_batch_size x train.grad_accum x world size", source)  # fmt: skip
    _fill(config, "gradient_clipping", train.grad_clip, "train.grad_clip", source)
    _fill(config, "bf16.enabled", train.use_gpu, "train.use_gpu", source)
    _fill(config, "zero_optimization.stage", train.zero_stage, "train.zero_stage", source)
    zero = config["zero_optimization"]
    if world_size == 1 and not _offloads(zero):
        # One rank has nothing to partition, so ZeRO 1-3 save no memory there and only add
        # per-gradient bucket copies: 1.43x a bare loop's step on CPU, stage 0 1.22x
        # (benchmarks/trainer_overhead.py). Offload still saves accelerator memory.
        zero["stage"] = 0
    if trainer_clips(config):
        # DeepSpeed's fp32 stage-0 path clips but drops the norm; the trainer clips with
        # torch's clip_grad_norm_, which returns it for train/grad_norm.
        config["gradient_clipping"] = 0.0
    if not train.use_gpu:
        # gloo cannot all-reduce bf16; fp32 on CPU (STACK-NOTES).
        config.setdefault("communication_data_type", "fp32")
    return config


def _offloads(zero: dict[str, Any]) -> bool:
    return any(
        zero.get(key, {}).get("device", "none") not in ("none", None)
        for key in ("offload_optimizer", "offload_param")
    )


def trainer_clips(config: dict[str, Any]) -> bool:
    """Whether the trainer, not DeepSpeed, clips the gradients of this filled config: fp32
    at ZeRO stage 0, where DeepSpeed passes the torch optimizer through."""
    return config["zero_optimization"]["stage"] == 0 and not config["bf16"]["enabled"]
