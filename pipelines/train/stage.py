"""``omni train``: DFM training on Ray Train + DeepSpeed, tracked in one MLflow run.

The driver checks every input, opens (or reopens) the MLflow run, claims the run's control
file and starts a ``TorchTrainer`` whose workers run ``training.train_loop.train_worker``.
The pattern is torchtitan's: the loop and its components live in ``training/``; this
module only assembles a run from the config and owns its lifecycle. The run's checkpoints
and control file live under ``<workspace>/checkpoints/<run_id>/``; Ray Train's own
checkpointing is not used (a reused Ray run name would restore silently, and DeepSpeed
writes its own state), so a Ray Train run belongs to one driver, named after the MLflow
run and the driver's owner token. Within it Ray Train restarts the worker group after a
lost worker or node (``train.max_failures``, ``recovery.py``); every group, first or
restarted, resumes from the latest complete checkpoint by itself. Resume by hand
(``--resume RUN_ID``) reads the logged ``model`` and ``train`` sections from MLflow and
starts a new driver on the same run, which its workers resume the same way.
"""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.config import ConfigError, apply_overrides, fingerprint
from infra.ray_runtime import connect, disconnect
from infra.storage import Storage, is_remote, join
from infra.tracking import Tracker, open_experiment, tracking_uri
from infra.worker_log import worker_log_dir
from pipelines.corpus import absolute
from pipelines.stage_state import RUNNING, SUCCESS, begin_stage, success_payload, write_marker
from pipelines.train.fingerprints import expected_fingerprint, train_sections
from pipelines.train.inputs import TrainInputError, TrainInputs, gather_inputs
from pipelines.train.progress import progress_bar
from pipelines.train.recovery import RecoveryLog, error_cause
from pipelines.train.resources import wait_for_workers
from training.checkpointing import latest_complete, step_name
from training.model_config import load_model_config
from training.run_control import RunControl
from training.train_config import ModelSection, TrainConfig
from training.train_loop import WorkerPlan, train_worker

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig

STAGE = "train"
LOGGED_CONFIG = "config/train_sections.json"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class TrainReport:
    """How the run ended and where everything is."""

    run_id: str
    experiment: str
    status: str  # FINISHED or KILLED
    step: int
    resumed_from: int | None
    checkpoints: str
    latest_checkpoint: str | None
    tracking_uri: str
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    logs: str | None = None  # the folder of the workers' full logs
    skipped: bool = False
    notes: list[str] = field(default_factory=list)


def run(
    config: PipelineConfig,
    resume: str | None = None,
    overrides: Iterable[str] = (),
    force: bool = False,
) -> TrainReport:
    """Train (or resume run ``resume``); returns when the run is finished or stopped.

    Without ``resume`` the stage follows ``begin_stage``: a run that finished with this
    config on these tokens is not trained again, and one that was interrupted (its
    ``_RUNNING.json`` names it) is resumed from its latest complete checkpoint.
    ``overrides`` are the ``--set`` assignments already applied to ``config``; on resume
    those touching ``model.``/``train.`` must agree with the logged run.
    """
    started = time.time()
    storage = Storage(config.storage)
    workspace = absolute(config.workspace)
    root = join(workspace, "checkpoints")
    if resume:
        if not config.mlflow.tracking_uri and not _local_store_exists(workspace):
            raise TrainInputError(f"unknown run id {resume!r}: no MLflow store in {workspace}")
        client, _ = open_experiment(config.mlflow, workspace)
        config = _logged_config(client, resume, config, overrides)
        if latest_complete(storage, join(root, resume)) is None:
            raise TrainInputError(
                f"run {resume} has no complete checkpoint in {join(root, resume)}"
            )
    _check_model(config)
    inputs = gather_inputs(config, storage)
    stage_dir = join(workspace, STAGE)
    stage_print = expected_fingerprint(config, inputs.data_fingerprint)
    notes: list[str] = []
    if not resume:
        begun = begin_stage(storage, stage_dir, stage_print)
        notes += begun.notes
        if begun.done is not None:
            return _finished_report(config, begun.done, workspace, started)
        interrupted = (begun.running or {}).get("run_id")
        if interrupted and latest_complete(storage, join(root, interrupted)) is not None:
            resume = interrupted
            notes.append(f"resuming the interrupted run {interrupted}")
    client, experiment_id = open_experiment(config.mlflow, workspace)
    if resume:
        _check_fingerprints(client.get_run(resume), inputs, force)
    uri = tracking_uri(config.mlflow, workspace)
    started_ray = connect(config.ray)
    try:
        wait_for_workers(config.train)
        if resume:
            run_id, resume_step = resume, latest_complete(storage, join(root, resume))
            client.update_run(run_id, status="RUNNING")
        else:
            run_id, resume_step = create_run(client, experiment_id, config, inputs), None
        run_dir = join(root, run_id)
        write_marker(storage, stage_dir, RUNNING,
                     {"stage": STAGE, "fingerprint": stage_print, "run_id": run_id})  # fmt: skip
        control = RunControl(storage, run_dir)
        owner = control.claim()
        plan = worker_plan(config, inputs, run_id, run_dir, uri, owner)
        with _stop_on_signals(control, owner) as stopping:
            try:
                _fit(config.train, plan, resume_step or 0)
            except BaseException as error:
                if stopping.is_set():
                    client.set_terminated(run_id, "KILLED")
                else:
                    client.set_tag(run_id, "error", error_cause(error)[:5000])
                    client.set_terminated(run_id, "FAILED")
                raise
            status = "KILLED" if stopping.is_set() else "FINISHED"
        client.set_terminated(run_id, status)
    finally:
        disconnect(started_ray)
    final = latest_complete(storage, run_dir)
    report = TrainReport(
        run_id=run_id,
        experiment=config.mlflow.experiment,
        status=status,
        step=final or 0,
        resumed_from=resume_step,
        checkpoints=run_dir,
        latest_checkpoint=join(run_dir, step_name(final)) if final is not None else None,
        tracking_uri=uri,
        seconds=round(time.time() - started, 1),
        metrics=_loss_metrics(client, run_id),
        logs=worker_log_dir(workspace, STAGE, run_id),
        notes=notes,
    )
    if status == "FINISHED":
        payload = success_payload(STAGE, stage_print, started, run_id=run_id, step=report.step)
        write_marker(storage, stage_dir, SUCCESS, payload)
    return report


def _loss_metrics(client: Any, run_id: str) -> dict[str, float]:
    metrics = client.get_run(run_id).data.metrics
    return {k: v for k, v in metrics.items() if k.startswith("train/loss")}


def _finished_report(
    config: PipelineConfig, done: dict[str, Any], workspace: str, started: float
) -> TrainReport:
    """The report of the run that already finished with this config: nothing to train."""
    client, _ = open_experiment(config.mlflow, workspace)
    run_dir = join(workspace, "checkpoints", done["run_id"])
    return TrainReport(
        run_id=done["run_id"],
        experiment=config.mlflow.experiment,
        status="FINISHED",
        step=done["step"],
        resumed_from=None,
        checkpoints=run_dir,
        latest_checkpoint=join(run_dir, step_name(done["step"])),
        tracking_uri=tracking_uri(config.mlflow, workspace),
        seconds=round(time.time() - started, 1),
        metrics=_loss_metrics(client, done["run_id"]),
        logs=worker_log_dir(workspace, STAGE, done["run_id"]),
        skipped=True,
        notes=[
            f"already trained with this config on these tokens: nothing to do (run "
            f"{done['run_id']}); to train a new run, change a model/train setting (e.g. "
            f"--set train.seed=1 or --set train.max_steps=N) or use another workspace"
        ],
    )


# ---------------------------------------------------------------------------- config


def _local_store_exists(workspace: str) -> bool:
    return not is_remote(workspace) and (Path(workspace) / "mlflow" / "mlflow.db").is_file()


def worker_plan(
    config: PipelineConfig,
    inputs: TrainInputs,
    run_id: str,
    run_dir: str,
    uri: str,
    owner: str,
) -> WorkerPlan:
    """What every training worker is given for ``run_id``: the whole plan, JSON-safe.

    Where to resume is not in it: every worker group, the first or one Ray Train
    restarted, finds the latest complete checkpoint in ``run_dir`` itself."""
    return WorkerPlan(
        run_id=run_id,
        tracking_uri=uri,
        owner=owner,
        run_dir=run_dir,
        storage=config.storage.model_dump(mode="json"),
        model=model_config(config.model).model_dump(mode="json"),
        objective=config.model.objective,
        path=config.model.path.model_dump(mode="json"),
        layout=inputs.layout,
        codebooks=inputs.codebooks,
        train=config.train.model_dump(mode="json"),
        shards=inputs.shards,
        eval_shards=inputs.eval_shards,
        shard_samples=inputs.shard_samples,
        weights=inputs.weights,
        fingerprints=_fingerprints(config, inputs),
        log_dir=worker_log_dir(absolute(config.workspace), STAGE, run_id),
    )


def model_config(section: ModelSection) -> Any:
    """The model preset of ``section.size`` with the section's own settings applied."""
    model = load_model_config(section.size)
    return model.model_copy(
        update={
            "pretrained": section.pretrained,
            "gradient_checkpointing": section.gradient_checkpointing,
        }
    )


def _check_model(config: PipelineConfig) -> None:
    try:
        model_config(config.model)
    except (KeyError, FileNotFoundError, ConfigError) as error:
        raise ConfigError(f"model.size: {error}") from None
    pretrained = config.model.pretrained
    if pretrained and not Path(pretrained).is_dir():
        raise ConfigError(f"model.pretrained: no such folder: {pretrained}")
    if config.model.objective == "ar" and config.model.path.loss != "cross_entropy":
        raise ConfigError("model.path.loss: the ar objective trains with cross_entropy only")


def _logged_config(
    client: Any, run_id: str, config: PipelineConfig, overrides: Iterable[str]
) -> PipelineConfig:
    """``config`` with the ``model`` and ``train`` sections run ``run_id`` was trained with."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        raise TrainInputError(f"unknown run id {run_id!r} in {client.tracking_uri}") from None
    with tempfile.TemporaryDirectory() as scratch:
        try:
            path = client.download_artifacts(run_id, LOGGED_CONFIG, scratch)
        except (MlflowException, OSError):
            raise TrainInputError(f"run {run_id} is not an omni train run") from None
        logged = json.loads(Path(path).read_text())
    sectioned = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in ("model", "train")]
    for assignment in sectioned:
        changed = apply_overrides(logged, [assignment])
        if changed != logged:
            key = assignment.split("=", 1)[0]
            raise ConfigError(
                f"--set {assignment}: run {run_id} was trained with a different {key}; "
                "a resumed run keeps its logged model and train settings"
            )
    return config.model_copy(
        update={
            "model": ModelSection.model_validate(logged["model"]),
            "train": TrainConfig.model_validate(logged["train"]),
        }
    )


def _fingerprints(config: PipelineConfig, inputs: TrainInputs) -> dict[str, str]:
    return {
        "config": fingerprint(train_sections(config)),
        "data": inputs.data_fingerprint,
        "layout": inputs.layout_fingerprint,
    }


def _check_fingerprints(run: Any, inputs: TrainInputs, force: bool) -> None:
    tags = run.data.tags
    for name, now in (("data", inputs.data_fingerprint), ("layout", inputs.layout_fingerprint)):
        then = tags.get(f"{name}.fingerprint")
        if then is not None and then != now and not force:
            raise TrainInputError(
                f"the {name} changed since run {run.info.run_id} started ({then} -> {now}); "
                "resuming on other data breaks exact resume: pass --force to resume anyway"
            )


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def create_run(client: Any, experiment_id: str, config: PipelineConfig, inputs: TrainInputs) -> str:
    prints = _fingerprints(config, inputs)
    tags = {
        "omni.stage": STAGE,
        "git.commit": _git_commit(),
        "config.fingerprint": prints["config"],
        "data.fingerprint": prints["data"],
        "layout.fingerprint": prints["layout"],
        "model.objective": config.model.objective,
    }
    run = client.create_run(experiment_id, run_name=f"train-{config.model.size}", tags=tags)
    tracker = Tracker(client, run.info.run_id)
    tracker.log_params(config)
    tracker.log_bytes(json.dumps(train_sections(config), indent=2).encode(), *_split(LOGGED_CONFIG))
    return run.info.run_id


def _split(artifact: str) -> tuple[str, str]:
    folder, name = artifact.rsplit("/", 1)
    return name, folder


# ---------------------------------------------------------------------------- Ray


def _fit(train: TrainConfig, plan: WorkerPlan, start: int) -> None:
    """Run the workers to the end of the run, drawing a progress bar from rank 0's steps."""
    with progress_bar(train.max_steps, start) as board:
        _fit_workers(train, {**asdict(plan), "progress": board})


def _fit_workers(train: TrainConfig, plan: dict[str, Any]) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_worker,
        train_loop_config=plan,
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"omni-{plan['run_id']}-{plan['owner'][:8]}",
            storage_path=str(Path(tempfile.gettempdir()) / "omni-ray-train"),
            # A lost worker or node restarts the worker group, which resumes from the
            # latest complete checkpoint by itself; RecoveryLog makes each restart visible.
            failure_config=FailureConfig(max_failures=train.max_failures),
            callbacks=[
                RecoveryLog(
                    plan["tracking_uri"],
                    plan["run_id"],
                    train.max_failures,
                    plan["storage"],
                    plan["run_dir"],
                )  # fmt: skip
            ],
        ),
    )
    trainer.fit()


@contextmanager
def _stop_on_signals(control: RunControl, owner: str) -> Iterator[threading.Event]:
    """SIGTERM / SIGINT ask the workers to checkpoint and stop; a second SIGINT aborts."""
    stopping = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return

    def handler(signum: int, frame: Any) -> None:
        if stopping.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stopping.set()
        control.request_stop(owner)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopping
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def first_line(error: BaseException) -> str:
    """The line of an error a person should read (a worker's, under Ray's wrapping)."""
    text = str(error).strip() or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray wraps a worker's exception; its own last line names it.
    return lines[-1] if lines else text
