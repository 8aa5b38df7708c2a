"""Real local services for development and tests: moto's S3 endpoint and an MLflow server.

Each service is a subprocess on a free local port, in its own session so that `stop()`
also ends the processes it spawns (`mlflow server` runs uvicorn as a child). Its output
goes to `<workdir>/<name>.log`, whose tail is quoted when the service fails to start.
Addresses are IPv4; services bind 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, TypeVar

import boto3

# moto accepts any credentials; these are the values its documentation uses.
DUMMY_AWS_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
DUMMY_AWS_REGION = "us-east-1"

_S = TypeVar("_S", bound="LocalService")

# Health checks must reach the local port directly, never through an HTTP(S)_PROXY.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServiceStartError(RuntimeError):
    """A local service is not installed, exited early, or never answered its health check."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _executable(name: str, install_hint: str) -> str:
    """Path of console script `name` in the running interpreter's environment."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise ServiceStartError(f"{path} not found: {install_hint}")
    return str(path)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send `sig` to every process of group `pgid`, if any is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` is still running.

    Zombies do not count: where PID 1 does not reap orphans (some containers), a child that
    outlived its parent stays in the group as a zombie forever.
    """
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: probe with signal 0, which also sees zombies
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):  # a scan, since orphans leave the parent's tree
        try:
            # Fields after the parenthesised command name: state, ppid, pgrp, ...
            state, _, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
        except OSError:  # the process ended while we looked
            continue
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False


def _wait_for_group(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait until the leader `proc` and the rest of its group have ended; False on timeout."""
    deadline = time.monotonic() + timeout
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    # The leader may exit before its children (uvicorn under `mlflow server`).
    while _group_alive(proc.pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class LocalService:
    """A subprocess that serves HTTP on `host:port` and answers GET `health_path` with 200.

    Subclasses give `name`, `health_path`, `start_timeout_s` and `command()`.
    """

    name = "service"
    health_path = "/"
    start_timeout_s = 30.0
    stop_grace_s = 10.0

    def __init__(self, workdir: str | os.PathLike[str], host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir).resolve()
        self.host = host
        self.port = free_port(host)
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the service, e.g. `http://127.0.0.1:5000`."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id (and process-group id) of the running service, None when stopped."""
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        """The argv that runs the service on `self.host`/`self.port`."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """Environment of the child process."""
        return dict(os.environ)

    def start(self: _S) -> _S:
        """Launch the process and block until it is healthy; raise ServiceStartError if not."""
        if self._proc is not None:
            raise RuntimeError(f"{self.name} is already running at {self.url}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            failure = self._wait_healthy()
        except BaseException:  # e.g. Ctrl-C during the wait: leave no server behind
            self.stop()
            raise
        if failure:
            self.stop()
            raise ServiceStartError(
                f"{self.name} {failure}; last lines of {self.log_path}:\n" + self._log_tail()
            )
        return self

    def stop(self) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after `stop_grace_s`."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        _signal_group(proc.pid, signal.SIGTERM)
        if not _wait_for_group(proc, self.stop_grace_s):
            _signal_group(proc.pid, signal.SIGKILL)
            _wait_for_group(proc, self.stop_grace_s)

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_healthy(self) -> str | None:
        """Poll the health URL; return why the service is unusable, or None once healthy."""
        assert self._proc is not None
        health_url = self.url + self.health_path
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if (code := self._proc.poll()) is not None:
                return f"exited with code {code} before {health_url} answered"
            try:
                with _DIRECT.open(health_url, timeout=2) as response:
                    if response.status == 200:
                        return None
            except OSError:  # refused while starting up, or a non-200 HTTPError
                pass
            time.sleep(0.2)
        return f"did not answer {health_url} within {self.start_timeout_s:.0f} s"

    def _log_tail(self, lines: int = 20) -> str:
        with open(self.log_path, errors="replace") as log:
            return "".join(deque(log, maxlen=lines))


class MotoServer(LocalService):
    """moto's in-memory AWS (S3 and the rest) over real HTTP, as a stand-in for S3."""

    name = "moto"
    health_path = "/moto-api/"
    start_timeout_s = 30.0

    def command(self) -> list[str]:
        moto = _executable("moto_server", "install the `dev` extra: pip install -e '.[dev]'")
        return [moto, "-H", self.host, "-p", str(self.port)]

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint to give boto3 / s3fs (`endpoint_url=`)."""
        return self.url

    def s3_client(self) -> Any:
        """A boto3 S3 client for this server, with dummy credentials."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=DUMMY_AWS_REGION,
            **DUMMY_AWS_CREDENTIALS,
        )

    def create_bucket(self, name: str) -> None:
        """Create S3 bucket `name`."""
        self.s3_client().create_bucket(Bucket=name)


class MlflowServer(LocalService):
    """An MLflow tracking server with a SQLite store; artifacts are proxied by the server.

    Runs and metrics go to `<workdir>/mlflow.db`, artifacts to `<workdir>/artifacts`.
    """

    name = "mlflow"
    health_path = "/health"
    start_timeout_s = 240.0  # uvicorn is up after 8-17 s idle, ~70 s on a machine at load 15

    def command(self) -> list[str]:
        mlflow = _executable("mlflow", "install the project: pip install -e .")
        return [
            mlflow, "server",
            "--host", self.host,
            "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination", str(self.workdir / "artifacts"),
            "--workers", "1",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        # No usage telemetry (nor ~/.config/mlflow/). No job runner: MLflow 3 otherwise starts
        # a huey job runner with eight consumer processes beside the server (its GenAI jobs,
        # which tracking never uses), each importing mlflow and polling while idle.
        return {
            **super().env(),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }

    @property
    def tracking_uri(self) -> str:
        """The URI for `mlflow.set_tracking_uri` / `MlflowClient(tracking_uri=...)`."""
        return self.url
