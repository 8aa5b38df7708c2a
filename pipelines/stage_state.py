"""Stage completion markers and the quarantine table, shared by every stage.

A stage is done when ``<stage dir>/_SUCCESS.json`` exists; it is written last, and it
carries the fingerprint of the config and inputs that produced the stage's output.
pyarrow is imported where a table is built or read, so reading markers (``omni status``,
planning) does not load it.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infra.storage import Storage, join

if TYPE_CHECKING:
    import pyarrow as pa

SUCCESS = "_SUCCESS.json"
RUNNING = "_RUNNING.json"

QUARANTINE_COLUMNS = ("id", "native_id", "source", "stage", "reason", "detail")  # strings


def read_marker(storage: Storage, stage_dir: str, name: str) -> dict[str, Any] | None:
    """The parsed marker file, or None if it does not exist."""
    uri = join(stage_dir, name)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


def write_marker(storage: Storage, stage_dir: str, name: str, payload: dict[str, Any]) -> None:
    storage.write_bytes(join(stage_dir, name), json.dumps(payload, indent=2).encode())


@dataclass
class StageStart:
    """How a stage run begins: already done, resuming an interrupted run, or fresh."""

    done: dict[str, Any] | None  # the matching _SUCCESS payload: nothing to do
    running: dict[str, Any] | None  # _RUNNING.json of an interrupted run with this fingerprint
    notes: list[str] = field(default_factory=list)


def begin_stage(storage: Storage, stage_dir: str, fingerprint: str) -> StageStart:
    """Skip-if-done and stale-output handling, shared by every stage.

    Output made with another fingerprint (config or inputs changed) is removed, so a
    rebuilt stage never mixes old and new files, nor keeps a stale ``_SUCCESS.json``.
    """
    success = read_marker(storage, stage_dir, SUCCESS)
    if success and success.get("fingerprint") == fingerprint:
        return StageStart(done=success, running=None)
    running = read_marker(storage, stage_dir, RUNNING)
    previous = success or running
    if previous and previous.get("fingerprint") != fingerprint:
        storage.remove(stage_dir, recursive=True)
        note = "config or inputs changed since the last run: output rebuilt from scratch"
        return StageStart(done=None, running=None, notes=[note])
    return StageStart(done=None, running=running)


def success_payload(stage: str, fingerprint: str, started: float, **counts: Any) -> dict:
    """The ``_SUCCESS.json`` content: what ran, on which fingerprint, when, with what result."""
    return {
        "stage": stage,
        "fingerprint": fingerprint,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 3),
        **counts,
    }


def quarantine_table(rows: list[dict[str, str]]) -> pa.Table:
    import pyarrow as pa

    schema = pa.schema([(name, pa.string()) for name in QUARANTINE_COLUMNS])
    return pa.Table.from_pylist(rows, schema=schema)


def parquet_bytes(table: pa.Table, **options: Any) -> bytes:
    """Serialise a table to Parquet in memory, for an atomic write through Storage."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    return buffer.getvalue()


def read_parquet(storage: Storage, uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file as a table. ``ParquetFile`` rather than ``pq.read_table``: the
    latter goes through ``pyarrow.dataset``, whose import loads pandas (a second, here)."""
    import pyarrow.parquet as pq

    with storage.open(uri, "rb") as handle:
        return pq.ParquetFile(handle).read(columns=columns)
