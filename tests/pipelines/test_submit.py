"""``omni submit`` against a real Ray head node (``ray start --head`` on 127.0.0.1).

The head is this test's own: its own ports and temp dir, started with ``--block`` in
its own process group and stopped by signalling that group (``ray stop`` would stop
every Ray instance on the machine). Commands run from a directory that is not the
repository; the job gets the project through its ``runtime_env`` (``pip: null``: the
head's environment already has the requirements, and no network is needed). Ctrl-C and
``--stop`` are tried on a job that sleeps in place of the stage's, so nothing is timed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from typer.testing import CliRunner

from infra.services import LocalService, free_port
from infra.storage import Storage
from pipelines.cli import app
from pipelines.config import load_pipeline_config
from pipelines.workflow import run as workflow
from pipelines.workflow import submit as jobs
from pipelines.workflow.dag import pipeline_stages
from tests.builders import read_docs, write_jsonl
from tests.conftest import REPO, SAMPLE_CORPUS

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

pytestmark = pytest.mark.integration
runner = CliRunner()


class RayHead(LocalService):
    """``ray start --head --block``; ``port`` is the dashboard's (the Jobs API)."""

    name = "ray-head"
    health_path = "/api/version"
    start_timeout_s = 120.0

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.temp_dir = tempfile.mkdtemp(prefix="omni-ray-", dir="/tmp")  # short: socket paths

    def command(self) -> list[str]:
        ray = str(Path(sys.executable).parent / "ray")
        return [ray, "start", "--head", "--block", "--port", str(free_port()),
                "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.port), "--include-dashboard", "true",
                "--num-cpus", "2", "--object-store-memory", str(200 * 2**20),
                "--temp-dir", self.temp_dir, "--disable-usage-stats",
                # Other Ray instances on this machine hold the default agent ports.
                "--dashboard-agent-listen-port", str(free_port()),
                "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()),
                "--metrics-export-port", str(free_port()),
                "--ray-client-server-port", str(free_port())]  # fmt: skip

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # its sessions: sockets, logs, jobs

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in super().env().items() if not k.startswith("RAY_ADDRESS")}
        # As on a cluster image: `python` on the PATH is the one with Ray and the requirements.
        path = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return {**env, "PATH": path, "RAY_AUTH_MODE": "disabled"}


def wait_for_job_agent(url: str, timeout_s: float = 120) -> None:
    """The dashboard answers before the node's job agent does: submit until one is taken."""
    from ray.job_submission import JobSubmissionClient

    client, deadline = JobSubmissionClient(url), time.monotonic() + timeout_s
    while True:
        try:
            client.submit_job(entrypoint="true")
            return
        except RuntimeError:  # "No available agent to submit job, please try again later"
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RayHead(tmp_path_factory.mktemp("ray-head")) as head:
        wait_for_job_agent(head.url)
        yield head.url


def write_config(folder: Path, corpus: Path, **sections: dict) -> Path:
    path = folder / "pipeline.yaml"
    data = {
        "workspace": str(folder / "ws"),
        "corpus": {"inputs": [{"uri": str(corpus), "format": "jsonl"}]},
        "shard": {"target_tokens": 2000, "jsonl_split_bytes": 4096},
        "submit": {"runtime_env": {"pip": None}},
        **sections,
    }
    path.write_text(json.dumps(data))
    return path


def omni(command: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, [command, *args], env={"COLUMNS": "250"})
    crashed = "" if isinstance(result.exception, SystemExit | None) else repr(result.exception)
    return result.exit_code, result.output + crashed


def submit(*args: str) -> tuple[int, str]:
    return omni("submit", *args)


def test_submit_a_stage_attach_to_it_and_see_a_failure(
    ray_head: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    docs = [d for d in read_docs(SAMPLE_CORPUS) if {s["type"] for s in d["segments"]} == {"text"}]
    write_jsonl(tmp_path / "docs.jsonl", docs[:12])
    config = write_config(tmp_path, tmp_path / "docs.jsonl")

    code, output = submit("shard", "-c", str(config), "--address", ray_head, "--wait")
    assert code == 0, output
    [submission_id] = [w for w in output.split() if w.startswith("omni-shard-")][:1]
    assert f"{submission_id} SUCCEEDED" in output
    marker = json.loads((tmp_path / "ws" / "shards" / "_SUCCESS.json").read_text())
    assert marker["documents_out"] == 12
    # The plan computes the fingerprint the stage wrote: the next run skips it.
    pipeline = load_pipeline_config(config)
    plans = workflow.plan(pipeline, pipeline_stages(), Storage(), only="shard")
    assert (plans[0].action, plans[0].fingerprint) == ("skip", marker["fingerprint"])
    record = workflow.read_state(Storage(), str(tmp_path / "ws"), "shard")
    assert record["state"] == "done" and record["submission_id"] == submission_id

    code, output = submit("shard", "-c", str(config), "--address", ray_head, "--wait")
    assert code == 0 and f"attached to {submission_id} (SUCCEEDED)" in output, output

    status = runner.invoke(app, ["status", "-c", str(config), "--address", ray_head, "--json"])
    rows = {row["stage"]: row for row in json.loads(status.output)}
    assert rows["shard"]["state"] == "done" and rows["shard"]["ray_job_id"] == submission_id
    assert rows["tokenizers"]["state"] == "pending"

    # omni run on a cluster is the same job as omni submit: --only shard attaches to it.
    code, output = omni("run", "--only", "shard", "-c", str(config), "--address", ray_head)
    assert code == 0 and f"attached to {submission_id} (SUCCEEDED)" in output, output

    missing = write_config(elsewhere, tmp_path / "no-such.jsonl")
    code, output = submit("shard", "-c", str(missing), "--address", ray_head, "--wait")
    assert code == 1, output
    [reason] = [line for line in output.splitlines() if line.startswith("error:")]
    assert "FAILED: shard: corpus.inputs[0].uri: no such file:" in reason and "no-such" in reason

    code, output = submit("shard", "-c", str(config), "--set", "shard.target_tokens=-3",
                          "--address", ray_head)  # fmt: skip
    assert code == 2 and "shard.target_tokens" in output, output


def test_resubmitting_a_running_workflow_after_a_stage_finished_finds_its_one_job(
    ray_head: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``omni submit run``, then the same command from another folder once ``shard`` has
    finished: it attaches to the running job, and the cluster has one job for the work."""
    from ray.job_submission import JobSubmissionClient

    first_folder, second_folder = tmp_path / "a", tmp_path / "b"
    first_folder.mkdir()
    second_folder.mkdir()
    config = write_config(tmp_path, SAMPLE_CORPUS / "docs.jsonl", tokenizers=SLOW_TOKENIZERS)
    monkeypatch.chdir(first_folder)
    code, output = submit("run", "-c", str(config), "--address", ray_head)
    assert code == 0, output
    [job] = [w for w in output.split() if w.startswith("omni-run-")][:1]
    client = JobSubmissionClient(ray_head)
    try:
        marker, deadline = tmp_path / "ws" / "shards" / "_SUCCESS.json", time.monotonic() + 240
        while not marker.exists():
            assert time.monotonic() < deadline and str(client.get_job_status(job)) in (
                "PENDING", "RUNNING"), client.get_job_logs(job)[-3000:]  # fmt: skip
            time.sleep(1)
        monkeypatch.chdir(second_folder)
        code, output = submit("run", "-c", str(config), "--address", ray_head)
        assert code == 0 and f"attached to {job} (RUNNING)" in output, output
        runs = [j.submission_id for j in client.list_jobs()
                if (j.submission_id or "").startswith("omni-run-")]  # fmt: skip
        assert runs == [job]
    finally:
        client.stop_job(job)
        wait_for_status(client, job, "STOPPED")


# The tokenizer warm-up of the workflow above: long enough to still run when it is resubmitted.
SLOW_TOKENIZERS = {"warmup": {"image_steps": 100000, "audio_steps": 0, "image_batch": 2}}


# The stage's job, as long as the test needs it (bounded: it ends by itself after 120 s).
SLOW_JOB = "python -c \"import time; print('slow job started', flush=True); time.sleep(120)\""


def wait_for_status(
    client: JobSubmissionClient, job: str, wanted: str, timeout_s: float = 90
) -> None:
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job))) != wanted:
        assert time.monotonic() < deadline, f"{job}: {status}, not {wanted}"
        time.sleep(0.5)


def test_ctrl_c_detaches_from_a_job_and_stop_ends_it(
    ray_head: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.job_submission import JobSubmissionClient

    config = write_config(tmp_path, tmp_path / "docs.jsonl")
    pipeline = load_pipeline_config(config)
    job = jobs.submission_base(pipeline, "shard", jobs.input_fingerprint(pipeline))
    client = JobSubmissionClient(ray_head)
    # The shard stage's job, already running: `omni submit shard --wait` attaches to it.
    client.submit_job(entrypoint=SLOW_JOB, submission_id=job)
    # Running before the CLI starts: `omni submit` answers within a second now, and would
    # otherwise attach while the job is still PENDING (its runtime env being set up).
    wait_for_status(client, job, "RUNNING")
    cli = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "submit", "shard", "-c", str(config),
         "--address", ray_head, "--wait"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "COLUMNS": "250"},
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(cli.stdout or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("slow job started" in line for line in lines):  # its logs stream here
            assert cli.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        cli.send_signal(signal.SIGINT)  # Ctrl-C
        assert cli.wait(timeout=30) == 130
    finally:
        cli.kill()
    reader.join(timeout=10)
    output = "".join(lines)
    assert f"attached to {job} (RUNNING)" in output and f"detached; {job} keeps running" in output
    assert f"re-attach: ray job logs -f {job} --address {ray_head}" in output, output
    assert str(client.get_job_status(job)) == "RUNNING"  # detaching stopped nothing

    code, output = submit("--stop", job, "--address", ray_head)
    assert code == 0 and f"{job}: stopping" in output, output
    wait_for_status(client, job, "STOPPED")
    code, output = submit("--stop", job, "--address", ray_head)
    assert code == 0 and f"{job}: already ended" in output, output
