"""The launchers in infra.services start real moto and MLflow servers, and stop them fully."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import boto3
import psutil
import pytest
from mlflow import MlflowClient

from infra.services import (
    LocalService,
    MlflowServer,
    MotoServer,
    ServiceStartError,
    free_port,
)

pytestmark = pytest.mark.integration


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, which init may never reap here, is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_moto_serves_s3(moto_server: MotoServer) -> None:
    moto_server.create_bucket("put-get")
    s3 = moto_server.s3_client()
    s3.put_object(Bucket="put-get", Key="dir/hello.txt", Body=b"hello")

    assert s3.get_object(Bucket="put-get", Key="dir/hello.txt")["Body"].read() == b"hello"
    assert "put-get" in [bucket["Name"] for bucket in s3.list_buckets()["Buckets"]]


def test_s3_env_lets_plain_boto3_reach_moto(s3_env: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_env)  # credentials and region from the env
    s3.create_bucket(Bucket="from-env")
    s3.put_object(Bucket="from-env", Key="k", Body=b"v")

    assert s3.get_object(Bucket="from-env", Key="k")["Body"].read() == b"v"
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"


@pytest.mark.parametrize("fixture", ["moto_server", "mlflow_server"])
def test_servers_bind_loopback_only(fixture: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue(fixture)
    # On Linux all of 127.0.0.0/8 reaches the loopback device: a server bound to 0.0.0.0
    # accepts on 127.0.0.2, one bound to 127.0.0.1 refuses. Check the premise first.
    with socket.create_server(("0.0.0.0", 0)) as wildcard:
        if not _accepts("127.0.0.2", wildcard.getsockname()[1]):
            pytest.skip("127.0.0.2 does not reach the loopback device here")

    assert server.url == f"http://127.0.0.1:{server.port}"
    assert _accepts("127.0.0.1", server.port)
    assert not _accepts("127.0.0.2", server.port)


def test_mlflow_tracks_runs_and_proxies_artifacts(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    run = client.create_run(client.create_experiment("test-services"))
    run_id = run.info.run_id
    client.log_param(run_id, "lr", "0.001")
    client.log_metric(run_id, "loss", 0.5, step=3)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    client.log_artifact(run_id, str(note), artifact_path="notes")
    client.set_terminated(run_id)

    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"lr": "0.001"}
    assert stored.data.metrics == {"loss": 0.5}
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    # The artifact went through the server into its artifacts directory.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    [on_server] = (mlflow_server.workdir / "artifacts").rglob("note.txt")
    assert on_server.read_text() == "hello"
    assert (mlflow_server.workdir / "mlflow.db").is_file()


def test_stop_closes_the_port_and_ends_the_process(tmp_path: Path) -> None:
    server = MotoServer(tmp_path).start()
    port, pid = server.port, server.pid
    assert pid is not None and _accepts("127.0.0.1", port)

    server.stop()

    assert server.pid is None
    assert not _accepts("127.0.0.1", port)
    assert not _running(pid)
    server.stop()  # a second stop is a no-op


class _ChildHttpServer(LocalService):
    """An HTTP server run as the child of a shell, as uvicorn runs under `mlflow server`."""

    name = "child-http"
    stop_grace_s = 1.0

    def __init__(self, workdir: Path, ignore_sigterm: bool) -> None:
        super().__init__(workdir)
        self.ignore_sigterm = ignore_sigterm

    def command(self) -> list[str]:
        server = (
            "import http.server, os, signal\n"
            "open('child.pid', 'w').write(str(os.getpid()))\n"
            f"if {self.ignore_sigterm}: signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"http.server.HTTPServer(({self.host!r}, {self.port}),"
            " http.server.SimpleHTTPRequestHandler).serve_forever()"
        )
        return ["/bin/sh", "-c", f'"{sys.executable}" -c "$0" & wait', server]


@pytest.mark.parametrize("ignore_sigterm", [False, True])
def test_stop_ends_the_whole_process_group(tmp_path: Path, ignore_sigterm: bool) -> None:
    service = _ChildHttpServer(tmp_path, ignore_sigterm).start()
    port, shell_pid = service.port, service.pid
    child_pid = int((tmp_path / "child.pid").read_text())
    assert shell_pid is not None and _running(child_pid) and child_pid != shell_pid

    started = time.monotonic()
    service.stop()
    elapsed = time.monotonic() - started

    assert not _accepts("127.0.0.1", port)
    assert not _running(shell_pid) and not _running(child_pid)
    if ignore_sigterm:  # killed only once the grace period ran out
        assert service.stop_grace_s <= elapsed < service.stop_grace_s + 3
    else:
        assert elapsed < service.stop_grace_s


class _Crashing(LocalService):
    name = "crashing"

    def command(self) -> list[str]:
        script = "import sys\nfor i in range(1, 31): print('line', i)\nsys.exit(3)"
        return [sys.executable, "-c", script]


def test_a_service_that_exits_raises_with_its_last_log_lines(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ServiceStartError, match="exited with code 3") as raised:
        _Crashing(tmp_path).start()

    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert "line 11\n" in message and "line 30\n" in message
    assert "line 10\n" not in message  # only the last 20 lines


class _Deaf(LocalService):
    name = "deaf"
    start_timeout_s = 1.0

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]


def test_a_service_that_never_answers_times_out_and_is_stopped(tmp_path: Path) -> None:
    service = _Deaf(tmp_path)
    with pytest.raises(ServiceStartError, match="did not answer") as raised:
        service.start()

    assert "up\n" in str(raised.value)
    assert service.pid is None


def test_missing_moto_names_the_dev_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(ServiceStartError, match="`dev` extra"):
        MotoServer(tmp_path).start()
