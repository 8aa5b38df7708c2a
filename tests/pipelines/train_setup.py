"""Configs for the tests that train: the sample corpus, quick tokenizers, a small trainer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil
from mlflow import MlflowClient

from pipelines.config import PipelineConfig
from tests.conftest import REPO, pipeline_config

CORPUS = REPO / "examples" / "corpus"
# Tokenizer quality does not matter to the stage tests; one k-means run seeds each codebook
# (the default best-of-4 is most of a warm-up of 2 steps: ~10 s of CPU each time).
QUICK_TOKENIZERS = {
    "text": {"vocab_size": 512},
    "image": {"quantizer": {"init_restarts": 1}},
    "audio": {"quantizer": {"init_restarts": 1}},
    "warmup": {"image_steps": 2, "audio_steps": 2, "image_batch": 4, "audio_batch": 2},
}
TRAIN = {
    "num_workers": 2,
    "micro_batch_size": 2,
    "grad_accum": 2,
    "warmup_steps": 2,
    "lr": 3e-3,
    "checkpoint_every": 4,
    "keep_last": 2,
}
INPUTS = [{"uri": str(CORPUS / "docs.jsonl"), "format": "jsonl"}]
# The uninterrupted run the interrupted ones are compared with (the ``reference_run``
# fixture): two workers, 20 steps, a checkpoint every 5, the last 2 kept.
REFERENCE = {"train": {"max_steps": 20, "checkpoint_every": 5}}


def config_for(workspace: Path, **sections: dict) -> PipelineConfig:
    """A pipeline config over the sample corpus; ``train`` entries override ``TRAIN``."""
    train = {**TRAIN, **sections.pop("train", {})}
    return pipeline_config(
        workspace,
        INPUTS,
        tokenizers=QUICK_TOKENIZERS,
        pretokenize={"eval_fraction": 0.2},
        train=train,
        **sections,
    )


def losses(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[tuple[int, float]]:
    """``(step, value)`` of every logged point of ``key``, in step order."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def copy_workspace(source: Path, target: Path) -> Path:
    """A new workspace with ``source``'s tokens and tokenizers (no runs, no MLflow store)."""
    for part in ("tokens", "tokenizers"):
        shutil.copytree(source / part, target / part)
    return target


def use_tokenizers(source: Path, workspace: Path) -> None:
    """Copy ``source``'s tokenizers into ``workspace``: the stage tests after the warm-up
    need tokenizers, not a warm-up of their own (test_tokenizers_stage.py tests that)."""
    shutil.copytree(source / "tokenizers", workspace / "tokenizers")


def train_workers(session_leader: int) -> list[psutil.Process]:
    """Ray Train worker processes started by the driver whose session is ``session_leader``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(process.pid) == session_leader and "RayTrainWorker" in " ".join(
                process.info["cmdline"] or []
            ):
                found.append(process)
        except (psutil.Error, ProcessLookupError):
            continue
    return found
