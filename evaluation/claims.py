"""Exactly-once evaluation of checkpoints by concurrent sweeps: atomic claims with leases.

Per (suite, run, checkpoint) a folder ``<workspace>/eval/claims/<suite>/<run_id>/step-NNNNNNN/``:

* ``attempt-K.json``: attempt K belongs to whoever *created* it. Creation is exclusive:
  ``os.link`` of a fully written temp file on local disk (fails if the name exists), a
  conditional PUT (``If-None-Match: *``) on S3. Two sweeps racing for a checkpoint both
  try to create the same next attempt; exactly one succeeds.
* The owner renews ``lease_until`` (a heartbeat) while it evaluates. A claim whose lease
  ran out (its sweep crashed) or whose owner recorded an error is taken over by creating
  attempt K + 1 - exclusively again - up to ``max_attempts``.
* ``done.json`` (created exclusively too): status ``finished`` with the metrics and the
  MLflow child run, or ``failed`` with every attempt's error. A done checkpoint is never
  claimed again, so ``omni sweep --once`` from cron is idempotent.
* The done record is the fence. A sweep that is slow but alive can see its lease run out
  (a stalled heartbeat, a paused VM) and attempt K + 1 taken over while it still
  evaluates; both then finish, and only the first to create ``done.json`` publishes. The
  record names the attempt that won (``attempt``, ``owner``); the other owner learns from
  :meth:`ClaimStore.finish` that it lost and discards its result.

The store only needs exclusive create, read, overwrite-own and list: the pattern of a
lease-based lock on object storage, with no lock server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from infra.storage import Storage, is_remote, join
from training.checkpointing import step_name

DONE = "done.json"
log = logging.getLogger(__name__)
ATTEMPT = re.compile(r"attempt-(\d+)\.json$")


def create_exclusive(storage: Storage, uri: str, data: bytes) -> bool:
    """Write ``data`` at ``uri`` only if nothing is there; True if this call created it.

    Readers never see a partial object: locally the content is written to a temp file
    first and hard-linked into place (``link`` fails when the name exists); on S3 the PUT
    is conditional (``If-None-Match: *``, answered 412 when the key exists).
    """
    fs, path = storage.filesystem(uri)
    if is_remote(uri):
        bucket, key = path.split("/", 1)
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except FileExistsError:  # s3fs's translation of 412 Precondition Failed
            return False
        finally:  # s3fs caches listings; this write went around it
            fs.invalidate_cache(path)
        return True
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)
    return True


@dataclass
class Claim:
    """Attempt ``attempt`` at evaluating ``run_id`` at ``step``, owned by this sweep."""

    run_id: str
    step: int
    attempt: int
    uri: str
    record: dict[str, Any]


@dataclass
class Exhausted:
    """Every attempt failed (or its sweep died): the checkpoint is to be marked failed."""

    run_id: str
    step: int
    errors: list[str]


class ClaimStore:
    """Claims and done records of one suite under ``<workspace>/eval/claims/<suite>/``."""

    def __init__(
        self, storage: Storage, workspace: str, suite: str, lease_s: float, max_attempts: int
    ) -> None:
        self.storage = storage
        self.root = join(workspace, "eval", "claims", suite)
        self.lease_s, self.max_attempts = lease_s, max_attempts
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def _fresh(self, uri: str) -> str:
        """``uri``, with any cached listing under it dropped: other sweeps write here."""
        if is_remote(uri):
            fs, path = self.storage.filesystem(uri)
            fs.invalidate_cache(path.split("*", 1)[0].rstrip("/"))
        return uri

    def folder(self, run_id: str, step: int) -> str:
        return join(self.root, run_id, step_name(step))

    def done_steps(self, run_id: str) -> dict[int, dict[str, Any]]:
        """``{step: done record}`` of a run, from one listing of its claims."""
        out: dict[int, dict[str, Any]] = {}
        for uri in self.storage.glob(self._fresh(join(self.root, run_id, "step-*", DONE))):
            record = json.loads(self.storage.read_bytes(uri))
            out[int(record["step"])] = record
        return out

    def done(self, run_id: str, step: int) -> dict[str, Any] | None:
        uri = join(self.folder(run_id, step), DONE)
        return (
            json.loads(self.storage.read_bytes(uri))
            if self.storage.exists(self._fresh(uri))
            else None
        )

    def attempts(self, run_id: str, step: int) -> list[dict[str, Any]]:
        """The attempt records of a checkpoint, in attempt order."""
        found = []
        for uri in self.storage.list(self._fresh(self.folder(run_id, step))):
            match = ATTEMPT.search(uri)
            if match:
                found.append((int(match.group(1)), uri))
        return [json.loads(self.storage.read_bytes(uri)) for _, uri in sorted(found)]

    def claim(self, run_id: str, step: int) -> Claim | Exhausted | None:
        """Take the next attempt at ``(run_id, step)``; None when it is done, held by a live
        lease, or another sweep took that attempt first."""
        if self.done(run_id, step) is not None:
            return None
        attempts = self.attempts(run_id, step)
        if attempts:
            last = attempts[-1]
            if last["status"] == "running" and last["lease_until"] > time.time():
                return None
        number = len(attempts) + 1
        if number > self.max_attempts:
            return Exhausted(run_id, step, [a.get("error") or "lease expired" for a in attempts])
        record = {
            "run_id": run_id,
            "step": step,
            "attempt": number,
            "owner": self.owner,
            "status": "running",
            "started_at": time.time(),
            "lease_until": time.time() + self.lease_s,
        }
        uri = join(self.folder(run_id, step), f"attempt-{number}.json")
        if not create_exclusive(self.storage, uri, json.dumps(record).encode()):
            return None
        return Claim(run_id, step, number, uri, record)

    def _rewrite(self, claim: Claim, **changes: Any) -> None:
        claim.record.update(changes)
        self.storage.write_bytes(claim.uri, json.dumps(claim.record).encode())

    @contextlib.contextmanager
    def heartbeat(self, claim: Claim) -> Iterator[None]:
        """Renew the claim's lease every third of it while the body runs. A renewal that
        fails (storage briefly away) is logged and tried again at the next beat: should
        the lease lapse meanwhile, the done record still keeps the result single."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease_s / 3):
                try:
                    self._rewrite(claim, lease_until=time.time() + self.lease_s)
                except Exception as error:  # a failed beat must not end the thread
                    log.warning("lease renewal of %s failed: %s", claim.uri, error)

        thread = threading.Thread(target=renew, name=f"lease-{claim.run_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def record_error(self, claim: Claim, error: str) -> None:
        """The attempt failed: its error is kept, and the next attempt may be taken."""
        self._rewrite(claim, status="error", error=error, finished_at=time.time())

    def finish(
        self, run_id: str, step: int, record: dict[str, Any], claim: Claim | None = None
    ) -> bool:
        """Publish the checkpoint's ``done.json``; False if another attempt already did, in
        which case the caller's result is not the checkpoint's and must be discarded.
        ``claim`` (the attempt that produced ``record``) is named in the record."""
        payload = {"run_id": run_id, "step": step, "finished_at": time.time(), **record}
        if claim is not None:
            payload.update(attempt=claim.attempt, owner=self.owner)
        uri = join(self.folder(run_id, step), DONE)
        return create_exclusive(self.storage, uri, json.dumps(payload, default=str).encode())

    def all_done(self) -> list[dict[str, Any]]:
        """Every done record of the suite (the sweep report's rows)."""
        pattern = join(self.root, "*", "step-*", DONE)
        return [
            json.loads(self.storage.read_bytes(uri))
            for uri in self.storage.glob(self._fresh(pattern))
        ]
