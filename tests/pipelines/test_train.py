"""``omni train`` end to end: real Ray Train, real DeepSpeed, real MLflow, moto S3."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow import MlflowClient

from infra.services import MlflowServer, MotoServer
from pipelines import train as train_stage
from pipelines.config import PipelineConfig
from tests.conftest import REPO, upload_folder
from tests.pipelines.train_setup import (
    REFERENCE,
    config_for,
    copy_workspace,
    losses,
    train_workers,
)
from tokenization.token_samples import read_token_samples
from training.checkpointing import COMPLETE, MODEL_DIR, complete_steps
from training.dfm import PathConfig, build_path
from training.held_out import held_out_loss
from training.model import OmniModel
from training.objective import Objective

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def eval_samples(workspace: Path) -> list:
    tars = sorted(str(p) for p in (workspace / "tokens").glob("*/*.tar"))
    return [s for s in read_token_samples(tars) if s.meta["split"] == "eval"]


def objective_for(model: OmniModel) -> Objective:
    return Objective(model, "dfm", build_path(PathConfig(), model.layout), "cross_entropy")


def test_two_workers_train_track_and_checkpoint(
    reference_run: tuple[PipelineConfig, train_stage.TrainReport],
) -> None:
    config, report = reference_run
    assert report.status == "FINISHED" and report.step == 20

    client = MlflowClient(report.tracking_uri)
    run = client.get_run(report.run_id)
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["train.num_workers"] == "2" and params["model.size"] == "tiny"
    assert {"git.commit", "config.fingerprint", "data.fingerprint"} <= set(tags)
    run_dir = Path(config.workspace) / "checkpoints" / report.run_id
    assert tags["checkpoint.latest"] == str(run_dir / "step-0000020")
    # Each rank's full log: the steps and checkpoints the console does not show.
    assert report.logs == str(Path(config.workspace) / "logs" / "train" / report.run_id)
    for rank in (0, 1):
        text = (Path(report.logs) / f"rank-{rank}.log").read_text()
        assert text.startswith(f"==== rank {rank}: pid ") and "step 20: " in text
        assert f"checkpoint of step 20 written (rank {rank})" in text
    # keep_last=2: steps 15 and 20 remain, each with a tag; 5 and 10 were pruned with theirs
    assert complete_steps_local(run_dir) == [15, 20]
    assert {k for k in tags if k.startswith("checkpoint.step-")} == {
        "checkpoint.step-0000015",
        "checkpoint.step-0000020",
    }
    history = losses(client, report.run_id)
    assert [step for step, _ in history] == list(range(1, 21))
    for key in ("train/lr", "train/grad_norm", "train/supervised_tokens_per_s",
                "train/step_seconds", "train/data_wait_fraction", "train/loss_ce",
                "gradnorm/weight_ce", "train/loss_ce_text"):  # fmt: skip
        assert key in metrics, key
    # The held-out loss on the eval split: at the last step (train.eval_every = 100 > 20).
    assert [step for step, _ in losses(client, report.run_id, "val/loss")] == [20]
    assert any(k.startswith("val/loss_ce_") for k in metrics)
    weights = [v for k, v in metrics.items() if k.startswith("gradnorm/weight_")]
    assert sum(weights) == pytest.approx(len(weights))

    # The consolidated weights load without DeepSpeed and beat the initial weights on held-out data.
    trained = OmniModel.load(run_dir / "step-0000020" / MODEL_DIR)
    torch.manual_seed(0)
    initial = OmniModel(trained.config, trained.layout, {
        m: getattr(trained, f"codebook_{m}") for m in ("image", "audio")})  # fmt: skip
    held_out = eval_samples(Path(config.workspace))
    assert len(held_out) > 10
    before = held_out_loss(objective_for(initial), held_out)
    after = held_out_loss(objective_for(trained), held_out)
    assert after < before - 0.5, (before, after)


def complete_steps_local(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run_dir.glob(f"step-*/{COMPLETE}"))


def test_sigkill_then_resume_logs_the_uninterrupted_losses(
    reference_run: tuple[PipelineConfig, train_stage.TrainReport],
    tokens_workspace: Path,
    tmp_path: Path,
) -> None:
    _, reference = reference_run
    expected = losses(MlflowClient(reference.tracking_uri), reference.run_id)
    steps = REFERENCE
    workspace = copy_workspace(tokens_workspace, tmp_path / "killed")
    killed = config_for(workspace, ray={"num_cpus": 2}, **steps)
    config_path = tmp_path / "killed.json"
    config_path.write_text(killed.model_dump_json())
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "train", "--config", str(config_path)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    checkpoints = workspace / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        workers: list[psutil.Process] = []
        while len(workers) < 2:  # found before the kill, so that finding them costs no steps
            assert driver.poll() is None, "the run ended before its workers were seen"
            assert time.monotonic() < deadline, "no training workers within 240 s"
            time.sleep(0.2)
            workers = train_workers(driver.pid)
        assert len(workers) == 2
        while not list(checkpoints.glob(f"*/step-0000005/{COMPLETE}")):
            assert driver.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        # Frozen first: on a fast machine the workers would otherwise train to the end in the
        # second Ray takes to notice the driver's death, and there would be nothing to resume.
        for worker in workers:
            worker.suspend()
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as the OOM killer would
        driver.wait(timeout=30)
        for worker in workers:
            worker.resume()
        gone, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, "training workers outlived their driver"
        [run_dir] = list(checkpoints.iterdir())
        written = sorted(str(p) for p in run_dir.rglob("*"))
        time.sleep(3)
        assert sorted(str(p) for p in run_dir.rglob("*")) == written, "a worker is still writing"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # what is left of its local Ray
    run_id = run_dir.name
    assert not list(run_dir.glob(f"step-0000020/{COMPLETE}"))
    client = MlflowClient(train_stage.stage.tracking_uri(killed.mlflow, str(workspace)))
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL: nobody ended it

    # Started again with the same config: the interrupted run is found and resumed.
    resumed = train_stage.run(killed)
    assert resumed.run_id == run_id and resumed.resumed_from >= 5 and resumed.step == 20
    assert client.get_run(run_id).info.status == "FINISHED"
    got = losses(client, run_id)
    assert [s for s, _ in got] == list(range(1, 21)), "a step logged twice or missing"
    assert got == expected  # bitwise on CPU
    again = train_stage.run(killed)  # finished with this config: nothing to do
    assert again.skipped and again.run_id == run_id and again.step == 20
    assert "nothing to do" in again.notes[0] and "--set train.seed=1" in again.notes[0]


def test_sigterm_checkpoints_and_marks_the_run_killed(
    tokens_workspace: Path, tmp_path: Path
) -> None:
    workspace = copy_workspace(tokens_workspace, tmp_path / "ws")
    config = config_for(workspace, ray={"num_cpus": 2}, train={"max_steps": 400,
                        "checkpoint_every": 100})  # fmt: skip
    config_path = tmp_path / "config.json"
    config_path.write_text(config.model_dump_json())
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "train", "--config", str(config_path)],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    client = MlflowClient(train_stage.stage.tracking_uri(config.mlflow, str(workspace)))
    try:
        deadline = time.monotonic() + 240
        while not _logged_steps(client, config.mlflow.experiment):
            assert driver.poll() is None, driver.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.5)
        driver.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, out[-3000:]
    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "KILLED"
    step = int(run.data.tags["checkpoint.latest"].rsplit("-", 1)[1])
    assert 0 < step < 400
    assert max(s for s, _ in losses(client, run.info.run_id)) == step
    # The console: one progress bar fed from rank 0, no known library noise.
    assert re.search(r"train: +\d+%.*\| *[1-9]\d*/400 .*loss=", out), out[-3000:]
    for noise in NOISE:
        assert noise not in out, (noise, out[-3000:])
    # The workers' INFO records go to their log files only.
    assert not re.search(r"step \d+: \S+=", out), out[-3000:]
    [log_dir] = (Path(config.workspace) / "logs" / "train").iterdir()
    assert re.search(rf"step {step}: \S+=", (log_dir / "rank-0.log").read_text())


NOISE = (
    "Setting accelerator to CPU",  # DeepSpeed
    "all_gather_into_tensor",  # torch's FutureWarning through DeepSpeed
    "PreemptionWatcher",  # Ray Train's watcher's C++ log line
    "Failed to query Ray Train Controller",  # Ray Train's placement-group cleaner
    "Attempting to start training worker group",  # Ray Train's banners
    "Setting up process group",
    "system metrics monitoring",  # MLflow's sampler starting and stopping
    "Traceback",
)


def _logged_steps(client: MlflowClient, experiment: str) -> int:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    runs = client.search_runs([found.experiment_id])
    return int(runs[0].data.metrics.get("train/step_seconds", 0) > 0) if runs else 0


def test_s3_workspace_checkpoints_and_resume(
    tokens_workspace: Path,
    moto_server: MotoServer,
    mlflow_server: MlflowServer,
    s3_env: str,
) -> None:
    def scratch() -> set[Path]:
        """Local copies of an s3:// run: staged checkpoints, resumed ones, tokenizers."""
        temp = Path(tempfile.gettempdir())
        return {p for pattern in ("omni-ckpt-*", "omni-resume-*", "tokenizers-*")
                for p in temp.glob(pattern)}  # fmt: skip

    before = scratch()
    upload_folder(moto_server, "train-bucket", "ws/tokens", tokens_workspace / "tokens")
    upload_folder(moto_server, "train-bucket", "ws/tokenizers", tokens_workspace / "tokenizers")
    config = config_for(
        Path("unused"),
        storage={"s3": {"endpoint_url": s3_env}},
        mlflow={"tracking_uri": mlflow_server.tracking_uri, "experiment": "train-s3"},
        train={"num_workers": 2, "max_steps": 4, "checkpoint_every": 2},
        model={"objective": "ar"},  # the AR baseline trains through the same trainer
    ).model_copy(update={"workspace": "s3://train-bucket/ws"})
    report = train_stage.run(config)
    prefix = f"ws/checkpoints/{report.run_id}"
    client = moto_server.s3_client()
    listed = client.list_objects_v2(Bucket="train-bucket", Prefix=prefix)["Contents"]
    keys = {o["Key"] for o in listed}
    for step in ("step-0000002", "step-0000004"):
        assert f"{prefix}/{step}/{COMPLETE}" in keys
        assert f"{prefix}/{step}/{MODEL_DIR}/model.safetensors" in keys
        for rank in (0, 1):  # each rank uploads its own state and ZeRO partition
            assert f"{prefix}/{step}/rank-{rank}.json" in keys
            assert f"{prefix}/{step}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in keys
    tracking = MlflowClient(mlflow_server.tracking_uri)
    logged = tracking.get_run(report.run_id).data
    assert logged.params["workspace"] == "s3://train-bucket/ws"
    assert logged.tags["checkpoint.latest"] == f"s3://train-bucket/{prefix}/step-0000004"
    expected = losses(tracking, report.run_id)
    # As if the run had died after step 2's checkpoint: step 4's is gone, resume from 2,
    # each rank from its own files (tests/training/test_checkpoint_files.py: which).
    client.delete_object(Bucket="train-bucket", Key=f"{prefix}/step-0000004/{COMPLETE}")
    resumed = train_stage.run(config, resume=report.run_id)
    assert resumed.resumed_from == 2 and resumed.step == 4
    assert losses(tracking, report.run_id) == expected
    storage = train_stage.stage.Storage(config.storage)
    assert complete_steps(storage, f"s3://train-bucket/{prefix}") == [2, 4]
    run = tracking.get_run(report.run_id).data
    assert run.tags["model.objective"] == "ar"
    assert run.tags["deepspeed.zero_stage"] == "2"
    assert len(tracking.get_metric_history(report.run_id, "train/grad_norm")) == 4
    assert scratch() <= before  # nothing of the run is left in the temp folder
