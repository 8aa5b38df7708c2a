"""Recovery from lost workers and nodes, and starting on a cluster still scaling up.

The fast tests here run the parts on their own (the callback against a real MLflow store,
the wait against the session's local Ray); the integration tests kill real workers and a
real node of a real two-node Ray cluster and check the run finishes as if nothing had
happened.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow import MlflowClient
from ray.exceptions import RayActorError

from infra.config import ConfigError
from infra.services import free_port
from infra.storage import StorageConfig
from pipelines import train as train_stage
from pipelines.config import PipelineConfig
from pipelines.train.recovery import CAUSE_TAG, RESTARTS, RecoveryLog, error_cause, failure_cause
from pipelines.train.resources import wait_for_workers
from tests.conftest import REPO
from tests.pipelines.train_setup import (
    REFERENCE,
    config_for,
    copy_workspace,
    losses,
    train_workers,
)
from training.checkpointing import COMPLETE
from training.train_config import TrainConfig

DEAD = (
    "The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n"
    "The actor is dead because its node has died. Node Id: abc\n"
)


def test_the_cause_is_the_worker_that_died_not_the_ranks_it_took_with_it() -> None:
    errors = {0: RuntimeError("gloo: Connection closed by peer"), 1: RayActorError(error_msg=DEAD)}
    assert failure_cause(errors) == (
        "rank 1: RayActorError: The actor is dead because its node has died. Node Id: abc"
    )
    raised = {1: ValueError("Traceback ...\n  File x\nValueError: bucket 'x' is empty")}
    assert failure_cause(raised) == "rank 1: ValueError: ValueError: bucket 'x' is empty"

    class Failed(Exception):  # the shape of Ray Train's WorkerGroupError
        worker_failures = errors

    assert error_cause(Failed("Training failed due to worker errors: ...")) == failure_cause(errors)


@pytest.fixture
def tracked_run(tmp_path: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    return uri, client.create_run(experiment).info.run_id


def test_each_recovery_is_a_metric_a_tag_and_one_line(
    tracked_run: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, run_id = tracked_run
    run_dir = tmp_path / "checkpoints" / run_id
    for step in (5, 10):  # 10 is not complete: a save cut short by the failure
        (run_dir / f"step-{step:07d}").mkdir(parents=True)
    (run_dir / "step-0000005" / COMPLETE).write_text("{}")
    log = RecoveryLog(uri, run_id, 1, StorageConfig().model_dump(mode="json"), str(run_dir))
    log.after_exception(None, {1: RayActorError(error_msg=DEAD)})
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("omni train: restarting the workers from step 5 (restart 1, ")
    assert "train.max_failures=1) after rank 1: RayActorError: The actor is dead" in line
    client = MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, RESTARTS)] == [(5, 1.0)]
    assert client.get_run(run_id).data.tags[CAUSE_TAG].startswith("restart 1: rank 1: Ray")
    # The second failure is past the limit: Ray Train ends the run, nothing is restarted.
    log.after_exception(None, {0: RuntimeError("worker raised")})
    assert capsys.readouterr().out == ""
    assert len(client.get_metric_history(run_id, RESTARTS)) == 1
    # A preempted node has its own, unlimited budget in Ray Train: still restarted.
    log.after_exception(None, {0: RayActorError(error_msg=DEAD, preempted=True)})
    assert "(restart 2, " in capsys.readouterr().out
    assert [m.value for m in client.get_metric_history(run_id, RESTARTS)] == [1.0, 2.0]


def test_waiting_for_resources_is_one_line_then_a_clear_error(ray_cluster: None) -> None:
    out = io.StringIO()
    wait_for_workers(TrainConfig(num_workers=2, resources_timeout_s=5), out)  # 2 CPUs: fits
    assert out.getvalue() == ""
    too_many = TrainConfig(num_workers=3, resources_timeout_s=3)
    with pytest.raises(ConfigError, match=r"num_workers=3 .*resources_timeout_s=3 s"):
        wait_for_workers(too_many, out)
    [line] = out.getvalue().splitlines()
    assert line.startswith("omni train: waiting up to 3 s (train.resources_timeout_s)")
    assert "3 workers x {'CPU': 1.0}" in line
    wait_for_workers(TrainConfig(num_workers=2, resources_timeout_s=5), out)  # group removed


# ---------------------------------------------------------------------------- integration


class Driver:
    """``omni train`` in its own process and session, its output (with what Ray forwards
    from the train controller and workers) collected in a file that tests wait on."""

    def __init__(self, config: PipelineConfig, folder: Path, *extra: str) -> None:
        path = folder / "config.json"
        path.write_text(config.model_dump_json())
        self.output = folder / "driver.log"
        self._log = self.output.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "train", "--config", str(path), *extra],
            start_new_session=True,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"},
        )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_for(self, what: str, found: Callable[[], Any], deadline: float) -> Any:
        """Poll ``found`` until it is truthy; fail if the driver ends or time runs out."""
        while not (result := found()):
            assert self.process.poll() is None, f"the run ended before {what}:\n{self.tail()}"
            assert time.monotonic() < deadline, f"no {what} in time:\n{self.tail()}"
            time.sleep(0.05)
        return result

    def finish(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()

    def tail(self) -> str:
        return self.text()[-4000:]


def checkpoint_done(workspace: Path, step: int) -> Callable[[], list[Path]]:
    return lambda: list((workspace / "checkpoints").glob(f"*/step-{step:07d}/{COMPLETE}"))


class LocalCluster:
    """A real multi-node Ray cluster on this machine (STACK-NOTES): a head and worker nodes
    of one CPU each, each node its own raylet; every process of it names ``temp_dir`` in
    its command line, which is how it is found and ended (never ``ray stop``)."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="omni-ray-", dir="/tmp")  # short socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.ray = str(Path(sys.executable).parent / "ray")
        # The workers import the project from this tree; a lost node is noticed in ~3 s.
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled",
                    "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"}  # fmt: skip

    def _start(self, *args: str) -> psutil.Process:
        """``ray start`` a node; returns its raylet."""
        before = {p.pid for p in self.processes("raylet")}
        ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port"]  # fmt: skip
        command = [self.ray, "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                   "--object-store-memory", str(100 * 2**20), "--disable-usage-stats",
                   *(x for port in ports for x in (port, str(free_port())))]  # fmt: skip
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        [raylet] = [p for p in self.processes("raylet") if p.pid not in before]
        return raylet

    def start_head(self) -> psutil.Process:
        return self._start("--head", "--port", str(self.port), "--temp-dir", self.temp_dir,
                           "--include-dashboard", "false",
                           "--ray-client-server-port", str(free_port()))  # fmt: skip

    def add_node(self) -> psutil.Process:
        return self._start("--address", self.address)

    def processes(self, program: str = "") -> list[psutil.Process]:
        """This cluster's processes (of ``program``, the executable's name, if given)."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            command = process.info["cmdline"] or [""]
            if self.temp_dir in " ".join(command) and program in ("", Path(command[0]).name):
                found.append(process)
        return found

    def lose_node(self, raylet: psutil.Process) -> None:
        """The node dies: its raylet and every process it started (workers, agents)."""
        doomed = [raylet, *raylet.children(recursive=True)]
        for process in doomed:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(doomed, timeout=30)

    def stop(self) -> None:
        processes = self.processes()
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(processes, timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_lost_node_is_replaced_and_the_run_finishes_by_itself(
    reference_run: tuple[PipelineConfig, train_stage.TrainReport],
    tokens_workspace: Path,
    tmp_path: Path,
) -> None:
    """Two nodes of one CPU, one worker on each. The run waits for the second node to join,
    loses it after step 15's checkpoint, and finishes FINISHED by itself on the node that
    replaces it, logging each step once with the uninterrupted run's losses, bit for bit."""
    _, reference = reference_run
    expected = losses(MlflowClient(reference.tracking_uri), reference.run_id)
    cluster = LocalCluster()
    workspace = copy_workspace(tokens_workspace, tmp_path / "ws")
    config = config_for(workspace, ray={"address": cluster.address},
                        train={**REFERENCE["train"], "max_failures": 1,
                               "resources_timeout_s": 300})  # fmt: skip
    driver = None
    try:
        cluster.start_head()
        driver = Driver(config, tmp_path)
        deadline = time.monotonic() + 600
        # One CPU for two workers: the driver waits (one line) until a node joins.
        driver.wait_for("the wait for resources", lambda: "waiting up to" in driver.text(),
                        deadline)  # fmt: skip
        second = cluster.add_node()
        driver.wait_for("step 15's checkpoint", checkpoint_done(workspace, 15), deadline)
        cluster.lose_node(second)  # mid-run: steps 16-20 take seconds, this milliseconds
        driver.wait_for("the restart", lambda: "restarting the workers" in driver.text(),
                        deadline)  # fmt: skip
        # Only now a node joins: the new worker group can start nowhere else (the head has
        # one CPU for its two workers).
        cluster.add_node()
        code = driver.finish(timeout=max(1.0, deadline - time.monotonic()))
        out = driver.text()
    finally:
        if driver is not None:
            driver.close()
        cluster.stop()
    assert code == 0, out[-4000:]
    # One line each (each node's log monitor forwards the controller's output on one host,
    # so a line can arrive more than once here; never two different lines).
    assert len({line for line in out.splitlines() if "waiting up to" in line}) == 1
    assert len({line for line in out.splitlines() if "restarting the workers" in line}) == 1
    client = MlflowClient(train_stage.stage.tracking_uri(config.mlflow, str(workspace)))
    [run_dir] = list((workspace / "checkpoints").iterdir())
    run = client.get_run(run_dir.name)
    assert run.info.status == "FINISHED"
    got = losses(client, run_dir.name)
    assert [s for s, _ in got] == list(range(1, 21)), "a step logged twice or missing"
    assert got == expected  # bitwise on CPU
    [restart] = client.get_metric_history(run_dir.name, RESTARTS)
    assert (restart.step, restart.value) == (15, 1)
    assert run.data.tags[CAUSE_TAG].startswith("restart 1: rank ")


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_past_max_failures_the_run_fails_with_its_cause_and_resumes(
    reference_run: tuple[PipelineConfig, train_stage.TrainReport],
    tokens_workspace: Path,
    tmp_path: Path,
) -> None:
    """``train.max_failures=0``: a killed worker ends the run FAILED, naming the rank, with
    no restart; ``--resume`` then finishes it with the uninterrupted run's losses."""
    _, reference = reference_run
    expected = losses(MlflowClient(reference.tracking_uri), reference.run_id)
    workspace = copy_workspace(tokens_workspace, tmp_path / "ws")
    config = config_for(workspace, ray={"num_cpus": 2},
                        train={**REFERENCE["train"], "max_failures": 0})  # fmt: skip
    driver = Driver(config, tmp_path)
    try:
        deadline = time.monotonic() + 400
        workers = driver.wait_for("two workers", lambda: len(train_workers(driver.process.pid)) == 2
                                  and train_workers(driver.process.pid), deadline)  # fmt: skip
        driver.wait_for("step 15's checkpoint", checkpoint_done(workspace, 15), deadline)
        workers[-1].kill()
        code = driver.finish(timeout=max(1.0, deadline - time.monotonic()))
        out = driver.text()
    finally:
        driver.close()
    assert code == 1, out[-4000:]
    assert "training failed: rank " in out and "restarting the workers" not in out
    client = MlflowClient(train_stage.stage.tracking_uri(config.mlflow, str(workspace)))
    [run_dir] = list((workspace / "checkpoints").iterdir())
    run = client.get_run(run_dir.name)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("rank ")
    assert not client.get_metric_history(run_dir.name, RESTARTS)

    resumed = train_stage.run(config, resume=run_dir.name)
    assert resumed.status == "FINISHED" and resumed.resumed_from == 15 and resumed.step == 20
    got = losses(client, run_dir.name)
    assert [s for s, _ in got] == list(range(1, 21)), "a step logged twice or missing"
    assert got == expected
