"""One data-parallel rank of the real trainer, without Ray: ``python -m tests.training.ranks
SPEC RANK``.

Runs ``training.train_loop.Trainer`` (DeepSpeed engine, batch source, GradNorm,
checkpoints) in a gloo process group of ``spec["world"]`` processes on 127.0.0.1, so tests
can compare world sizes and ZeRO stages step by step and bound a hang with a timeout.
Metrics go to ``metrics.json`` (rank 0) instead of MLflow; each rank writes
``rank-R.json``: how its parameters are partitioned and, with ``record_gathers``, the
largest number of parameter elements gathered at once while writing the consolidated
weights.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tokenization.vocab import VocabLayout
from training import train_loop
from training.dfm import PathConfig
from training.model_config import load_model_config

LAYOUT = VocabLayout(text_size=100, image_size=32, audio_size=24)
OWNER = "harness"


def codebooks() -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(LAYOUT.image_size, 8, generator=generator).numpy(),
        "audio": torch.randn(LAYOUT.audio_size, 6, generator=generator).numpy(),
    }


class RecordingLog:
    """Stands in for MLflow (``StepLog``): keeps every step's metrics, writes them on close."""

    def __init__(self, tracking_uri: str, run_id: str, *args: Any, **kwargs: Any) -> None:
        self.path = Path(tracking_uri) / "metrics.json"
        self.steps: dict[int, dict[str, float]] = {}
        self.tags: dict[str, str] = {}

    def log(self, step: int, metrics: dict[str, float]) -> bool:
        self.steps[step] = dict(metrics)
        return True

    def set_tag(self, key: str, value: str) -> None:
        self.tags[key] = value

    def delete_tag(self, key: str) -> None:
        self.tags.pop(key, None)

    def flush(self) -> None:
        """Nothing is queued."""

    def close(self) -> None:
        self.path.write_text(json.dumps({"steps": self.steps, "tags": self.tags}))


class GatherRecorder:
    """Largest count of parameter elements one ``GatheredParameters`` gathers while armed."""

    def __init__(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        self.armed, self.largest = False, 0
        enter = GatheredParameters.__enter__
        recorder = self

        def recording_enter(context: Any) -> Any:
            if recorder.armed and context.enabled:
                size = sum(int(p.ds_numel) for p in context.params)
                recorder.largest = max(recorder.largest, size)
            return enter(context)

        GatheredParameters.__enter__ = recording_enter


def partitioning(model: torch.nn.Module) -> dict[str, int]:
    """How many parameters ZeRO-3 partitioned, and the sizes a gather can reach."""
    params = {id(p): p for p in model.parameters()}.values()
    partitioned = [p for p in params if hasattr(p, "ds_tensor") and not p.ds_persist]
    sizes = [
        sum(int(getattr(p, "ds_numel", p.numel())) for p in m.parameters(recurse=False))
        for m in model.modules()
    ]
    return {
        "params": len(params),
        "partitioned": len(partitioned),
        "local_elements": sum(int(p.ds_tensor.numel()) for p in partitioned),
        "total_elements": sum(int(getattr(p, "ds_numel", p.numel())) for p in params),
        "largest_module": max(sizes),
    }


def main(spec_path: str, rank: int) -> None:
    spec = json.loads(Path(spec_path).read_text())
    world = int(spec["world"])
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(spec["port"]),
        }
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    train_loop._cpu_collectives()
    train_loop.StepLog = RecordingLog
    recorder = GatherRecorder() if spec.get("record_gathers") else None
    plan = train_loop.WorkerPlan(
        run_id="harness",
        tracking_uri=spec["out_dir"],
        owner=OWNER,
        run_dir=spec["run_dir"],
        storage={},
        model=load_model_config("tiny").model_dump(mode="json"),
        objective="dfm",
        path=PathConfig().model_dump(mode="json"),
        layout=asdict(LAYOUT),
        codebooks=codebooks(),
        train=spec["train"],
        shards=spec["shards"],
        eval_shards=spec.get("eval_shards", spec["shards"]),
        shard_samples={},
        weights=spec["weights"],
        fingerprints={},
    )
    trainer = train_loop.Trainer(plan, rank, world)
    report: dict[str, Any] = {}
    if recorder is not None:
        save = trainer._save_consolidated

        def recorded_save(folder: Path) -> None:
            recorder.armed = True
            try:
                save(folder)
            finally:
                recorder.armed = False

        trainer._save_consolidated = recorded_save  # type: ignore[method-assign]
    setup = trainer.setup

    def described_setup() -> None:
        setup()
        report.update(zero_stage=trainer.zero_stage, **partitioning(trainer.model))

    trainer.setup = described_setup  # type: ignore[method-assign]
    trainer.train()
    if recorder is not None:
        report["largest_gather"] = recorder.largest
    out = Path(spec["out_dir"]) / f"rank-{rank}.json"
    out.write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
