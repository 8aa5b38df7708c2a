"""A worker's full log file: INFO records, prints and errors go to it; the console keeps
showing only what it showed before; nothing of the logging set-up outlives the block."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from infra.services import MotoServer
from infra.storage import S3Config, Storage, StorageConfig
from infra.worker_log import worker_log

log = logging.getLogger("training.some_module")


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("console_handler", [False, True])
def test_the_file_gets_info_prints_and_errors_the_console_only_warnings(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    console_handler: bool,
) -> None:
    """The console is Python's last resort (a worker with no handler) or a handler of
    the root's (Ray's, at INFO in its workers): either way it shows the warning, not the
    INFO record, which only the file gets."""
    root = logging.getLogger()
    recorder = Recorder()
    monkeypatch.setattr(root, "handlers", [recorder] if console_handler else [])
    monkeypatch.setattr(root, "level", logging.INFO)  # as Ray leaves it in its workers
    before = (root.level, list(root.handlers))
    directory = tmp_path / "logs" / "train" / "run"
    with worker_log(Storage(), str(directory), rank=1) as uri:
        log.info("step 3 loaded")
        log.warning("a skipped sample")
        print("printed by a library")
    assert uri == str(directory / "rank-1.log")
    text = Path(uri).read_text()
    assert text.startswith("==== rank 1: pid ")
    assert "INFO training.some_module: step 3 loaded" in text
    assert "WARNING training.some_module: a skipped sample" in text
    assert "printed by a library" in text
    console = capsys.readouterr()
    shown = recorder.messages if console_handler else console.err.splitlines()
    assert shown == ["a skipped sample"]
    assert "printed by a library" in console.out
    assert (root.level, list(root.handlers)) == before
    log.info("after the block")  # not in the file any more
    assert "after the block" not in Path(uri).read_text()


def test_a_second_worker_group_appends_and_an_error_is_logged_with_its_traceback(
    tmp_path: Path,
) -> None:
    with worker_log(Storage(), str(tmp_path), rank=0):
        log.info("first group")
    with pytest.raises(RuntimeError, match="boom"), worker_log(Storage(), str(tmp_path), 0):
        raise RuntimeError("boom")
    text = (tmp_path / "rank-0.log").read_text()
    assert text.count("==== rank 0: pid ") == 2 and "first group" in text
    assert "worker ended by RuntimeError('boom')" in text and "Traceback" in text


@pytest.mark.integration
def test_on_s3_the_file_is_uploaded_when_the_worker_ends(
    moto_server: MotoServer, s3_env: str
) -> None:
    moto_server.create_bucket("worker-logs")
    storage = Storage(StorageConfig(s3=S3Config(endpoint_url=s3_env)))
    with worker_log(storage, "s3://worker-logs/ws/logs/train/run", rank=0) as uri:
        log.info("on s3")
        assert not storage.exists(uri)  # written locally while the worker runs
    assert uri.startswith("s3://worker-logs/ws/logs/train/run/rank-0-")
    assert b"INFO training.some_module: on s3" in storage.read_bytes(uri)
