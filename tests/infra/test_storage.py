"""Storage over local paths and a real moto S3 server: atomic writes, glob, retries."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from infra.services import MotoServer
from infra.storage import S3Config, Storage, StorageConfig, StorageError, join, parent


def test_local_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    storage = Storage()
    target = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(target, b"one")
    storage.write_bytes(target, b"two")
    assert storage.read_bytes(target) == b"two"
    assert os.listdir(tmp_path / "a") == ["b.bin"]
    with storage.atomic_writer(str(tmp_path / "c.bin")) as out:
        out.write(b"xyz")
    assert storage.read_range(str(tmp_path / "c.bin"), 1, 3) == b"yz"


def test_failed_atomic_writer_publishes_nothing(tmp_path: Path) -> None:
    storage = Storage()
    target = str(tmp_path / "never.bin")
    with pytest.raises(RuntimeError), storage.atomic_writer(target) as out:
        out.write(b"partial")
        raise RuntimeError("crash mid-write")
    assert not storage.exists(target)


def test_local_glob_list_remove_keep_the_callers_style(tmp_path: Path) -> None:
    storage = Storage()
    for name in ("x/1.jsonl", "x/2.jsonl", "x/3.txt"):
        storage.write_bytes(str(tmp_path / name), b"{}")
    assert storage.glob(str(tmp_path / "x" / "*.jsonl")) == [
        str(tmp_path / "x" / "1.jsonl"),
        str(tmp_path / "x" / "2.jsonl"),
    ]
    assert len(storage.list(str(tmp_path / "x"))) == 3
    assert storage.list(str(tmp_path / "missing")) == []
    storage.remove(str(tmp_path / "x"), recursive=True)
    assert not storage.exists(str(tmp_path / "x"))
    storage.remove(str(tmp_path / "x"), recursive=True)  # missing is fine


def test_open_is_read_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="read-only"):
        Storage().open(str(tmp_path / "f"), "wb")


def test_join_and_parent_keep_uri_style() -> None:
    assert join("s3://b/p", "shards", "x") == "s3://b/p/shards/x"
    assert parent("s3://b/p/x.tar") == "s3://b/p"
    assert join("/tmp/w", "shards") == os.path.join("/tmp/w", "shards")


def test_unreachable_endpoint_fails_fast_with_one_clear_error(s3_env: str) -> None:
    storage = Storage(
        StorageConfig(s3=S3Config(endpoint_url="http://127.0.0.1:9"), retries=2, backoff_s=0.05)
    )
    started = time.monotonic()
    with pytest.raises(StorageError) as error:
        storage.exists("s3://bucket/key")
    assert time.monotonic() - started < 15
    message = str(error.value)
    assert "cannot reach S3 endpoint http://127.0.0.1:9" in message
    assert "after 2 attempts" in message


def test_transient_errors_are_retried_with_backoff(tmp_path: Path) -> None:
    storage = Storage(StorageConfig(retries=3, backoff_s=0.01))
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "ok"

    assert storage.retry("s3://b/k", flaky) == "ok"
    assert len(calls) == 3
    assert calls[2] - calls[1] >= calls[1] - calls[0]  # the delay grows


@pytest.mark.integration
def test_s3_round_trip_through_moto(moto_server: MotoServer, s3_env: str) -> None:
    moto_server.create_bucket("storage-test")
    storage = Storage(StorageConfig(s3=S3Config(endpoint_url=s3_env)))
    storage.write_bytes("s3://storage-test/dir/a.bin", b"alpha")
    storage.write_bytes("s3://storage-test/dir/b.bin", b"beta")
    assert storage.exists("s3://storage-test/dir/a.bin")
    assert storage.read_bytes("s3://storage-test/dir/b.bin") == b"beta"
    assert storage.read_range("s3://storage-test/dir/a.bin", 1, 3) == b"lp"
    assert storage.size("s3://storage-test/dir/a.bin") == 5
    assert storage.glob("s3://storage-test/dir/*.bin") == [
        "s3://storage-test/dir/a.bin",
        "s3://storage-test/dir/b.bin",
    ]
    assert storage.isdir("s3://storage-test/dir")
    storage.remove("s3://storage-test/dir", recursive=True)
    assert not storage.exists("s3://storage-test/dir/a.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://storage-test/none")
