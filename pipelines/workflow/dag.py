"""The pipeline's stage DAG: shard -> tokenizers -> pretokenize -> train -> eval.

One :class:`~pipelines.workflow.run.Stage` per stage, in order: the folder of its markers,
the fingerprint it would write now (over its config section and its upstream
``_SUCCESS.json`` fingerprints; shard and train through the ``expected_fingerprint`` the
stage itself writes with, so the plan and the stage cannot drift), how to run it and how
to describe what it produced. The eval sweep writes no stage marker: its
fingerprint (``eval`` section + the training's) lives in the workflow's record, so a
finished sweep of an unchanged run is skipped without opening MLflow. Stage modules are
imported only when a stage is planned or run: they pull in torch, DeepSpeed and MLflow.

The tokenizer warm-up and the evaluation sweep are not Ray programs of their own: on a
cluster (``ray.address`` set, as in a submitted job or a RayJob) each runs as one Ray task
with the resources of ``workflow.tokenizers`` / ``workflow.eval`` (:func:`_placed`), so it
lands on a worker that has them (a GPU) and not in the driver on the head; with a local
Ray they run in this process, the only machine there is.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from infra.config import fingerprint, public_dict
from infra.storage import Storage, StorageError, join
from pipelines.corpus import absolute
from pipelines.stage_state import SUCCESS, read_marker, read_parquet
from pipelines.workflow.config import TaskResources
from pipelines.workflow.run import Markers, Stage

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipelines.config import PipelineConfig

EVAL_MODULE = "pipelines.eval.stage"


def _shard_fingerprint(config: PipelineConfig, storage: Storage, markers: Markers) -> str | None:
    from pipelines.corpus import expand_inputs
    from pipelines.shard.fingerprints import expected_fingerprint

    try:
        return expected_fingerprint(config, expand_inputs(config.corpus, storage))
    except (FileNotFoundError, StorageError):
        return None


def _tokenizers_fingerprint(
    config: PipelineConfig, storage: Storage, markers: Markers
) -> str | None:
    shards = markers.get("shard")
    return fingerprint("tokenizers", config.tokenizers, shards["fingerprint"]) if shards else None


def _pretokenize_fingerprint(
    config: PipelineConfig, storage: Storage, markers: Markers
) -> str | None:
    shards, tokenizers = markers.get("shard"), markers.get("tokenizers")
    if not shards or not tokenizers:
        return None
    return fingerprint(
        "pretokenize", config.pretokenize, shards["fingerprint"], tokenizers["fingerprint"]
    )


def _train_fingerprint(config: PipelineConfig, storage: Storage, markers: Markers) -> str | None:
    from pipelines.train.fingerprints import data_fingerprint, expected_fingerprint

    tokens = markers.get("pretokenize")
    if not tokens:
        return None
    manifest_uri = join(absolute(config.workspace), "tokens", "manifest.parquet")
    manifest = read_parquet(storage, manifest_uri).to_pylist()
    return expected_fingerprint(config, data_fingerprint(tokens["fingerprint"], manifest))


def _eval_fingerprint(config: PipelineConfig, storage: Storage, markers: Markers) -> str | None:
    trained = markers.get("train")
    return (
        fingerprint("eval", public_dict(config.eval), trained["fingerprint"]) if trained else None
    )


def _run_shard(config: PipelineConfig) -> Any:
    from pipelines.shard import stage as shard

    return shard.run(config)


def _placed(
    function: Callable[..., Any], config: PipelineConfig, resources: TaskResources, *args: Any
) -> Any:
    """``function(config, *args)``: on a cluster as a Ray task holding ``resources``, with a
    local Ray in this process (see the module docstring)."""
    if not config.ray.address:
        return function(config, *args)
    from infra.ray_runtime import connect
    from pipelines.ray_units import run_as_task

    connect(config.ray)  # kept for the stages after this one (the workflow's session)
    return run_as_task(
        function, config, *args, num_cpus=resources.num_cpus, num_gpus=resources.num_gpus
    )


def _run_tokenizers(config: PipelineConfig) -> Any:
    from pipelines.tokenizers import stage as tokenizers_stage

    return _placed(tokenizers_stage.run, config, config.workflow.tokenizers)


def _run_pretokenize(config: PipelineConfig) -> Any:
    from pipelines.pretokenize import stage as pretokenize

    return pretokenize.run(config)


def _run_train(config: PipelineConfig) -> Any:
    from pipelines import train

    return train.run(config)


@dataclass
class EvalOutcome:
    """The sweep of the training run's checkpoints; skipped when none was new."""

    run_id: str
    sweep: Any  # pipelines.eval.stage.SweepReport
    skipped: bool


def _run_eval(config: PipelineConfig) -> EvalOutcome:
    trained = read_marker(
        Storage(config.storage), join(absolute(config.workspace), "train"), SUCCESS
    )
    if not trained:
        raise FileNotFoundError("no finished training run in the workspace: run `omni train`")
    report = _placed(_sweep_run, config, config.workflow.eval, trained["run_id"])
    if report.failed:
        notes = "; ".join(report.notes)
        raise RuntimeError(
            f"{report.failed} checkpoint(s) failed evaluation{': ' if notes else ''}{notes}"
        )
    return EvalOutcome(trained["run_id"], report, skipped=not report.evaluated)


def _sweep_run(config: PipelineConfig, run_id: str) -> Any:
    """The eval stage's sweep: every new checkpoint of the workflow's training run."""
    from pipelines.eval import stage as eval_stage

    return eval_stage.sweep(config, run_ids=[run_id])


def _eval_available() -> str | None:
    if importlib.util.find_spec(EVAL_MODULE) is None:
        return f"pending: {EVAL_MODULE} not available"
    return None


def _describe_shard(marker: dict[str, Any] | None, report: Any) -> str:
    if not marker:
        return ""
    quarantined = sum(marker.get("quarantined", {}).values())
    return (
        f"{marker['documents_out']} documents in {marker['shards']} shards, "
        f"{quarantined} quarantined"
    )


def _describe_tokenizers(marker: dict[str, Any] | None, report: Any) -> str:
    if not marker:
        return ""
    steps = ", ".join(f"{k} {v}" for k, v in marker.get("steps", {}).items())
    text = f"vocabulary of {marker['vocab_size']} ids; warm-up steps: {steps or 'none'}"
    after, palette = marker.get("after", {}), marker.get("palette", {})
    held_out = [
        f"{label} {after[key]:{fmt}} (palette {palette[key]:{fmt}})"
        for key, label, fmt in (("image_psnr", "PSNR", ".1f"), ("audio_mel_l1", "mel-L1", ".3f"))
        if key in after and key in palette
    ]
    return text + (f"; held out: {', '.join(held_out)}" if held_out else "")


def _describe_pretokenize(marker: dict[str, Any] | None, report: Any) -> str:
    if not marker:
        return ""
    buckets = marker.get("buckets", {})
    samples = sum(b["samples"] for b in buckets.values())
    return f"{samples} samples in {marker['tars']} tars over {len(buckets)} buckets"


def _describe_train(marker: dict[str, Any] | None, report: Any) -> str:
    if not marker:
        return ""
    return f"MLflow run {marker['run_id']}, step {marker['step']}"


def _describe_eval(marker: dict[str, Any] | None, report: Any) -> str:
    if not isinstance(report, EvalOutcome):
        return ""
    sweep = report.sweep
    return (
        f"run {report.run_id}: {sweep.evaluated} checkpoint(s) evaluated now, "
        f"{len(sweep.rows)} in the table"
    )


def _train_user_errors() -> tuple[type[BaseException], ...]:
    from pipelines.train import TrainInputError

    return (TrainInputError,)


def pipeline_stages() -> list[Stage]:
    """The real stages, in DAG order."""
    return [
        Stage(
            "shard",
            (),
            _run_shard,
            "shards",
            _shard_fingerprint,
            _describe_shard,
            uses_ray=True,
        ),
        Stage(
            "tokenizers",
            ("shard",),
            _run_tokenizers,
            "tokenizers",
            _tokenizers_fingerprint,
            _describe_tokenizers,
        ),
        Stage(
            "pretokenize",
            ("shard", "tokenizers"),
            _run_pretokenize,
            "tokens",
            _pretokenize_fingerprint,
            _describe_pretokenize,
            uses_ray=True,
        ),
        Stage(
            "train",
            ("pretokenize",),
            _run_train,
            "train",
            _train_fingerprint,
            _describe_train,
            user_errors=_train_user_errors,
            uses_ray=True,
        ),
        Stage(
            "eval",
            ("train",),
            _run_eval,
            fingerprint=_eval_fingerprint,
            describe=_describe_eval,
            available=_eval_available,
        ),
    ]
