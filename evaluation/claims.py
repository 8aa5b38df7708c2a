"""Exactly-once evaluation of checkpoints by concurrent sweeps: atomic claims with leases.

Per (suite, run, checkpoint) a folder ``<workspace>/eval/claims/<suite>/<run_id>/step-NNNNNNN/``:

* ``attempt-K.json``: attempt K belongs to whoever *created* it. Creation is exclusive
  (:func:`infra.conditional_writes.create_exclusive`: a hard link locally, a conditional
  PUT on S3 whose 412 and 409 answers both mean "someone else was first"). Two sweeps
  racing for a checkpoint both try to create the same next attempt; exactly one succeeds.
* The owner rewrites its attempt (a heartbeat) every third of ``lease_s`` while it
  evaluates. The lease has lapsed when the attempt was last written more than its
  owner's ``lease_s`` ago *by the store's clock* (S3's ``LastModified`` against its
  ``Date``), so sweeps on machines whose clocks disagree judge it alike; ``lease_until``
  in the record is the owner's own clock, for people. A lapsed claim (its sweep died or
  stalled) or one whose owner recorded an error is taken over by creating attempt K + 1,
  exclusively again, up to ``max_attempts``; the taker learns which attempts lapsed
  (``Claim.lapsed``), so it can end what they left open.
* ``result.json`` (created exclusively) is the fence. A sweep that is slow but alive can
  see its lease lapse and attempt K + 1 taken over while it still evaluates; both then
  finish, and only the first to create ``result.json`` publishes (:meth:`ClaimStore.publish`
  tells the other it lost, and it discards its result). The record names the winner.
* ``done.json`` (created exclusively too) is written last: for a published result only
  once it is complete elsewhere (the caller's mirrored metrics and ended MLflow run); for a
  checkpoint that ``failed`` or was ``pruned``, directly. A done checkpoint is never
  claimed again, so ``omni sweep --once`` from cron is idempotent. A result without a
  done record (its publisher died in between) is handed out as :class:`Published` once
  the publisher's lease lapsed, for the caller to complete.

The store only needs exclusive create, read, overwrite-own, list and the store's clock:
the pattern of a lease-based lock on object storage, with no lock server.
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
from dataclasses import dataclass, field
from typing import Any

from infra.conditional_writes import age_s, create_exclusive
from infra.storage import Storage, is_remote, join
from training.checkpointing import step_name

DONE = "done.json"
RESULT = "result.json"
log = logging.getLogger(__name__)
ATTEMPT = re.compile(r"attempt-(\d+)\.json$")


@dataclass
class Claim:
    """Attempt ``attempt`` at evaluating ``run_id`` at ``step``, owned by this sweep."""

    run_id: str
    step: int
    attempt: int
    uri: str
    record: dict[str, Any]
    lapsed: list[int] = field(default_factory=list)  # earlier attempts whose lease lapsed


@dataclass
class Exhausted:
    """Every attempt failed (or its sweep died): the checkpoint is to be marked failed."""

    run_id: str
    step: int
    errors: list[str]
    lapsed: list[int] = field(default_factory=list)


@dataclass
class Published:
    """A published result with no done record whose publisher's lease lapsed: the caller
    completes what the publisher left undone, then writes the done record."""

    run_id: str
    step: int
    record: dict[str, Any]


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

    def attempt_uri(self, run_id: str, step: int, attempt: int) -> str:
        return join(self.folder(run_id, step), f"attempt-{attempt}.json")

    def _attempts(self, run_id: str, step: int) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for uri in self.storage.list(self._fresh(self.folder(run_id, step))):
            match = ATTEMPT.search(uri)
            if match:
                found.append((int(match.group(1)), uri))
        return [(uri, json.loads(self.storage.read_bytes(uri))) for _, uri in sorted(found)]

    def attempts(self, run_id: str, step: int) -> list[dict[str, Any]]:
        """The attempt records of a checkpoint, in attempt order."""
        return [record for _, record in self._attempts(run_id, step)]

    def lapsed(self, uri: str, record: dict[str, Any]) -> bool:
        """Whether the attempt ``record`` at ``uri`` went unrenewed for longer than its
        owner's lease, by the store's clock (a missing attempt has no lease)."""
        try:
            return age_s(self.storage, uri) > float(record.get("lease_s", self.lease_s))
        except FileNotFoundError:
            return True

    def attempt_lapsed(self, run_id: str, step: int, attempt: int) -> bool:
        uri = self.attempt_uri(run_id, step, attempt)
        try:
            record = json.loads(self.storage.read_bytes(uri))
        except FileNotFoundError:
            return True
        return self.lapsed(uri, record)

    def published(self, run_id: str, step: int) -> dict[str, Any] | None:
        """The published result of a checkpoint (``result.json``), or None."""
        uri = join(self.folder(run_id, step), RESULT)
        if not self.storage.exists(self._fresh(uri)):
            return None
        return json.loads(self.storage.read_bytes(uri))

    def claim(self, run_id: str, step: int) -> Claim | Exhausted | Published | None:
        """Take the next attempt at ``(run_id, step)``; None when it is done, held by a live
        lease, or another sweep took that attempt first; :class:`Published` when a result
        awaits completion by whoever asks."""
        if self.done(run_id, step) is not None:
            return None
        published = self.published(run_id, step)
        if published is not None:
            lapsed = self.attempt_lapsed(run_id, step, int(published["attempt"]))
            return Published(run_id, step, published) if lapsed else None
        attempts = self._attempts(run_id, step)
        if attempts:
            uri, last = attempts[-1]
            if last["status"] == "running" and not self.lapsed(uri, last):
                return None
        lapsed = [int(record["attempt"]) for _, record in attempts if record["status"] == "running"]
        number = len(attempts) + 1
        if number > self.max_attempts:
            errors = [record.get("error") or "lease expired" for _, record in attempts]
            return Exhausted(run_id, step, errors, lapsed)
        record = {
            "run_id": run_id,
            "step": step,
            "attempt": number,
            "owner": self.owner,
            "status": "running",
            "started_at": time.time(),
            "lease_s": self.lease_s,
            "lease_until": time.time() + self.lease_s,
        }
        uri = self.attempt_uri(run_id, step, number)
        if not create_exclusive(self.storage, uri, json.dumps(record).encode()):
            return None
        return Claim(run_id, step, number, uri, record, lapsed)

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

    def publish(self, claim: Claim, record: dict[str, Any]) -> dict[str, Any] | None:
        """Publish ``claim``'s result as the checkpoint's (``result.json``): the published
        record (it names the attempt, the owner and ``published_ms``, the one timestamp
        every copy of its metrics is logged with), or None if another attempt published
        first, in which case the caller's result is not the checkpoint's and is discarded."""
        payload = {
            "run_id": claim.run_id,
            "step": claim.step,
            **record,
            "attempt": claim.attempt,
            "owner": self.owner,
            "published_ms": int(time.time() * 1000),
        }
        uri = join(self.folder(claim.run_id, claim.step), RESULT)
        data = json.dumps(payload, default=str).encode()
        return json.loads(data) if create_exclusive(self.storage, uri, data) else None

    def finish(self, run_id: str, step: int, record: dict[str, Any]) -> bool:
        """Write the checkpoint's ``done.json``; False if someone else already did (a sweep
        that completed the same published result, or recorded the checkpoint failed)."""
        payload = {"run_id": run_id, "step": step, **record, "finished_at": time.time()}
        uri = join(self.folder(run_id, step), DONE)
        return create_exclusive(self.storage, uri, json.dumps(payload, default=str).encode())

    def all_done(self) -> list[dict[str, Any]]:
        """Every done record of the suite (the sweep report's rows)."""
        pattern = join(self.root, "*", "step-*", DONE)
        return [
            json.loads(self.storage.read_bytes(uri))
            for uri in self.storage.glob(self._fresh(pattern))
        ]
