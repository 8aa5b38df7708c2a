"""A training run's checkpoint, loaded for evaluation and generation (no DeepSpeed).

The run is looked up in MLflow (an ``omni train`` run: tag ``omni.stage=train``), its
model and path settings come from the logged ``config/train_sections.json``, the weights
from ``<workspace>/checkpoints/<run_id>/step-NNNNNNN/model/`` (complete checkpoints only,
copied locally first on S3). The tokenizers must have the checkpoint's vocabulary layout:
a model trained on other ids would decode nonsense, so that is refused, not guessed.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evaluation.errors import EvalInputError
from infra.storage import Storage, join
from tokenization.bundle import Tokenizers
from tokenization.vocab import LayoutMismatchError
from training.checkpointing import complete_steps, fetch_model, step_name
from training.dfm import ProbPath, build_path
from training.model import MEDIA, OmniModel
from training.train_config import ModelSection

LOGGED_SECTIONS = "config/train_sections.json"  # written by omni train


@dataclass
class RunInfo:
    """What evaluation needs to know about a training run, read once from MLflow."""

    run_id: str
    experiment_id: str
    name: str
    start_time: int
    model: ModelSection
    train: dict[str, Any]


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready to generate: the model on ``device``, its objective and path."""

    run: RunInfo
    step: int
    uri: str
    model: OmniModel
    path: ProbPath | None  # None for the AR baseline
    tokenizers: Tokenizers

    @property
    def objective(self) -> str:
        return self.run.model.objective

    @property
    def device(self) -> torch.device:
        return self.model.device


def run_info(client: Any, run_id: str) -> RunInfo:
    """The training run ``run_id``; EvalInputError if MLflow has no such train run."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise EvalInputError(f"unknown run id {run_id!r} in {client.tracking_uri}") from None
    if run.data.tags.get("omni.stage") != "train":
        raise EvalInputError(f"run {run_id} is not an omni train run (no tag omni.stage=train)")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = client.download_artifacts(run_id, LOGGED_SECTIONS, scratch)
        except (MlflowException, OSError):
            raise EvalInputError(f"run {run_id} has no {LOGGED_SECTIONS} artifact") from None
        sections = json.loads(Path(local).read_text())
    return RunInfo(
        run_id=run_id,
        experiment_id=run.info.experiment_id,
        name=run.info.run_name or run_id,
        start_time=int(run.info.start_time or 0),
        model=ModelSection.model_validate(sections["model"]),
        train=dict(sections["train"]),
    )


def run_dir(workspace: str, run_id: str) -> str:
    return join(workspace, "checkpoints", run_id)


def resolve_step(storage: Storage, workspace: str, run_id: str, step: int | None) -> int:
    """``step`` if that checkpoint of the run is complete, else the latest; EvalInputError
    naming what exists when there is none or not that one."""
    steps = complete_steps(storage, run_dir(workspace, run_id))
    if not steps:
        raise EvalInputError(
            f"run {run_id} has no complete checkpoint in {run_dir(workspace, run_id)}"
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise EvalInputError(
            f"run {run_id} has no complete checkpoint at step {step}; it has {steps}"
        )
    return step


def pick_device(name: str, cpu_threads: int) -> torch.device:
    """``auto`` -> CUDA when present, else the CPU with ``cpu_threads`` torch threads
    (measured on 2 busy cores: ``tiny`` generates 4-10x faster on one thread than on two,
    the threads' synchronisation costing more than its matrices)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalInputError("device cuda asked for, but torch sees no GPU")
    if name == "cpu":
        torch.set_num_threads(cpu_threads)
    return torch.device(name)


def load_checkpoint(
    storage: Storage,
    workspace: str,
    run: RunInfo,
    step: int,
    tokenizers: Tokenizers,
    device: torch.device,
) -> LoadedCheckpoint:
    """Weights of ``run`` at complete checkpoint ``step``, checked against ``tokenizers``."""
    uri = join(run_dir(workspace, run.run_id), step_name(step))
    with tempfile.TemporaryDirectory(prefix="omni-eval-") as scratch:
        model = OmniModel.load(fetch_model(storage, uri, Path(scratch)))
    try:
        tokenizers.layout.check_same(model.layout, f"checkpoint {uri}")
    except LayoutMismatchError as error:
        raise EvalInputError(str(error)) from None
    model = model.to(device).eval()
    path = None
    if run.model.objective == "dfm":
        config = run.model.path
        vectors = None
        if config.path == "metric":
            vectors = {m: model.codebook(m) for m in MEDIA}
            vectors["text"] = model.backbone.embed_tokens.weight.detach()
        path = build_path(config, model.layout, vectors)
    return LoadedCheckpoint(run, step, uri, model, path, tokenizers)
