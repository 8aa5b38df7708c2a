"""What the training benchmarks share: a token workspace, the model and the batches.

A benchmark either copies ``tokens/`` and ``tokenizers/`` from an existing workspace
(``--workspace``; it is never written to) or builds both from the sample corpus with
``omni shard``, ``omni tokenizers train`` and ``omni pretokenize`` on ``configs/sample.yaml``
into a temporary folder, so ``make bench`` works on a fresh clone. The built workspace uses
a short tokenizer warm-up (a few steps instead of the demo's two minutes): the vocabulary
sizes and every sample's length are the demo's, only the codebook quality differs, and
neither benchmark depends on it.

The model, objective, optimizer and micro-batches are built exactly as
``training.train_loop.Trainer.setup`` builds them (same seed, same layout and codebooks,
same ``BatchSource`` settings), so a bare loop and the trainer see the same weights and the
same batches.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infra.config import apply_overrides, load_yaml, validate
from infra.storage import Storage
from pipelines.config import PipelineConfig
from pipelines.train.inputs import TrainInputs, gather_inputs
from tokenization.vocab import VocabLayout
from training.batch_source import BatchSource, SourceSettings
from training.dfm import PathConfig, build_path
from training.model import MEDIA, OmniModel
from training.model_config import ModelConfig
from training.objective import Objective
from training.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "sample.yaml"
CORPUS = REPO / "examples" / "corpus" / "docs.jsonl"
RESULTS = REPO / "benchmarks" / "results"
QUICK_WARMUP = [
    "tokenizers.warmup.image_steps=4",
    "tokenizers.warmup.audio_steps=4",
    "tokenizers.warmup.max_seconds=30",
]
# The variables the Makefile exports (STACK-NOTES): set here too for a direct `python ...`.
ENVIRONMENT = {
    "RAY_AUTH_MODE": "disabled",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_extensions"),
}


def set_environment() -> None:
    """The Makefile's exported defaults, for runs outside ``make``."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def pipeline_config(workspace: Path, overrides: list[str] = ()) -> PipelineConfig:
    """``configs/sample.yaml`` with ``workspace``, an absolute corpus path and ``overrides``."""
    data = load_yaml(DEMO_CONFIG)
    data = apply_overrides(
        data, [f"workspace={workspace}", f"corpus.inputs.0.uri={CORPUS}", *overrides]
    )
    return validate(PipelineConfig, data, str(DEMO_CONFIG))


def prepare_workspace(source: Path | None, target: Path) -> Path:
    """``target`` holding ``tokens/`` and ``tokenizers/``: copied from ``source``, or built
    from the sample corpus by the three stages when ``source`` is None."""
    target.mkdir(parents=True, exist_ok=True)
    if source is not None:
        for part in ("tokens", "tokenizers"):
            if not (source / part).is_dir():
                raise SystemExit(f"--workspace {source}: no {part}/ folder")
            shutil.copytree(source / part, target / part)
        return target
    from pipelines.pretokenize import stage as pretokenize
    from pipelines.shard import stage as shard
    from pipelines.tokenizers import stage as tokenizers_stage

    config = pipeline_config(target, QUICK_WARMUP)
    print(f"building a token workspace from {CORPUS} in {target} ...", flush=True)
    shard.run(config)
    tokenizers_stage.run(config)
    pretokenize.run(config)
    shutil.rmtree(target / "shards", ignore_errors=True)  # not read by training
    return target


def train_inputs(config: PipelineConfig) -> TrainInputs:
    """What ``omni train``'s driver reads: shards per bucket, weights, layout, codebooks."""
    return gather_inputs(config, Storage(config.storage))


def build_objective(config: PipelineConfig, inputs: TrainInputs) -> Objective:
    """The trainer's ``Objective`` around a fresh ``OmniModel``, seeded as the trainer seeds it."""
    from pipelines.train.stage import model_config  # imports DeepSpeed: only when needed

    torch.manual_seed(config.train.seed)
    layout = VocabLayout(**inputs.layout)
    codebooks = {m: torch.from_numpy(np.asarray(inputs.codebooks[m])) for m in MEDIA}
    model_config = ModelConfig.model_validate(model_config(config.model).model_dump(mode="json"))
    model = OmniModel(model_config, layout, codebooks)
    path_cfg = PathConfig.model_validate(config.model.path.model_dump(mode="json"))
    path = None
    if config.model.objective == "dfm":
        vectors = {**codebooks, "text": model.backbone.embed_tokens.weight.detach()}
        path = build_path(path_cfg, layout, vectors if path_cfg.path == "metric" else None)
    return Objective(model, config.model.objective, path, path_cfg.loss)


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """The trainer's AdamW groups: no weight decay on biases, norms and 1-d parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """The trainer's optimizer: ``torch.optim.AdamW`` with its groups and settings."""
    return torch.optim.AdamW(
        param_groups(model), lr=train.lr, betas=train.betas, weight_decay=train.weight_decay
    )


def batch_source(
    config: PipelineConfig, inputs: TrainInputs, weights: dict[str, float] | None = None
) -> BatchSource:
    """Rank 0 of 1's ``BatchSource`` with the trainer's settings (``weights``: the
    schedule's bucket weights, default the run's)."""
    train = config.train
    layout = VocabLayout(**inputs.layout)
    return BatchSource(
        SourceSettings(
            shards=inputs.shards,
            eval_shards=inputs.eval_shards,
            shard_samples=inputs.shard_samples,
            weights=dict(weights or inputs.weights),
            seed=train.seed,
            rank=0,
            world=1,
            micro_batch_size=train.micro_batch_size,
            pad_id=layout.special_id("<PAD>"),
            dgs_block=train.dgs_block if config.model.objective == "dfm" else None,
            max_length=train.max_length,
            prefetch=train.prefetch,
        )
    )


def corruption_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The trainer's generator of micro-batch ``micro`` of optimizer step ``step`` (rank 0)."""
    from training.train_loop import _seed  # imports DeepSpeed: only when needed

    generator = torch.Generator()
    generator.manual_seed(_seed(seed, 0, step, micro))
    return generator


def machine() -> dict[str, Any]:
    """The machine and how busy it is now (1/5/15-minute load averages)."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
    }
