"""Claims: exclusive creation, leases, retries and done records, on local disk and S3."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from evaluation.claims import Claim, ClaimStore, Exhausted, create_exclusive
from infra.services import MotoServer
from infra.storage import Storage, StorageConfig


def store(workspace: Path | str, lease_s: float = 60.0, attempts: int = 3,
          storage: Storage | None = None) -> ClaimStore:  # fmt: skip
    return ClaimStore(storage or Storage(), str(workspace), "default", lease_s, attempts)


def test_create_exclusive_once_with_the_first_content(tmp_path: Path) -> None:
    uri = str(tmp_path / "a" / "claim.json")
    assert create_exclusive(Storage(), uri, b"first")
    assert not create_exclusive(Storage(), uri, b"second")
    assert Path(uri).read_bytes() == b"first"
    assert [p.name for p in Path(uri).parent.iterdir()] == ["claim.json"]  # no temp left


def test_a_live_claim_blocks_others_and_done_blocks_everyone(tmp_path: Path) -> None:
    first, second = store(tmp_path), store(tmp_path)
    claim = first.claim("run", 4)
    assert isinstance(claim, Claim) and claim.attempt == 1
    assert second.claim("run", 4) is None  # held by a live lease
    assert first.finish("run", 4, {"status": "finished", "metrics": {"m": 1.0}})
    assert not second.finish("run", 4, {"status": "finished"})  # done only once
    assert first.claim("run", 4) is None and second.claim("run", 4) is None
    assert second.done_steps("run")[4]["metrics"] == {"m": 1.0}


def test_an_expired_lease_is_taken_over_by_the_next_attempt(tmp_path: Path) -> None:
    crashed = store(tmp_path, lease_s=0.05)
    assert crashed.claim("run", 2).attempt == 1
    time.sleep(0.1)
    taken = store(tmp_path).claim("run", 2)
    assert isinstance(taken, Claim) and taken.attempt == 2


def test_the_heartbeat_keeps_a_slow_claim(tmp_path: Path) -> None:
    owner = store(tmp_path, lease_s=0.15)
    claim = owner.claim("run", 2)
    with owner.heartbeat(claim):
        time.sleep(0.4)  # longer than the lease: renewed meanwhile
        assert store(tmp_path).claim("run", 2) is None


def lease_lapses_then_both_finish(
    workspace: str, storage: Storage | None, slow_first: bool
) -> None:
    """A slow but live owner's lease lapses, a second sweep takes over; both finish. The
    first ``done.json`` wins, the other owner is told it lost, the record names the winner."""
    slow = store(workspace, lease_s=0.05, storage=storage)
    taker = store(workspace, storage=storage)
    stale = slow.claim("run", 2)
    time.sleep(0.1)
    taken = taker.claim("run", 2)
    assert isinstance(taken, Claim) and taken.attempt == 2
    first, second = (
        ((slow, stale), (taker, taken)) if slow_first else ((taker, taken), (slow, stale))
    )
    assert first[0].finish("run", 2, {"status": "finished", "metrics": {"m": 1.0}}, first[1])
    assert not second[0].finish("run", 2, {"status": "finished", "metrics": {"m": 2.0}}, second[1])
    record = taker.done("run", 2)
    assert (record["attempt"], record["owner"]) == (first[1].attempt, first[0].owner)
    assert record["metrics"] == {"m": 1.0}


@pytest.mark.parametrize("slow_first", [True, False])
def test_a_lapsed_but_live_owner_and_its_successor_publish_once(
    tmp_path: Path, slow_first: bool
) -> None:
    lease_lapses_then_both_finish(str(tmp_path), None, slow_first)


def test_a_failing_renewal_does_not_stop_the_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = store(tmp_path, lease_s=0.15)
    claim = owner.claim("run", 2)
    real, calls = ClaimStore._rewrite, []

    def flaky(self: ClaimStore, claim: Claim, **changes: object) -> None:
        calls.append(changes)
        if len(calls) == 1:
            raise OSError("storage away")
        real(self, claim, **changes)

    monkeypatch.setattr(ClaimStore, "_rewrite", flaky)
    with owner.heartbeat(claim):
        time.sleep(0.4)
        assert store(tmp_path).claim("run", 2) is None  # later beats renewed it
    assert len(calls) >= 2


def test_errors_are_retried_then_exhausted_with_every_error(tmp_path: Path) -> None:
    owner = store(tmp_path, attempts=2)
    for attempt in (1, 2):
        claim = owner.claim("run", 6)
        assert isinstance(claim, Claim) and claim.attempt == attempt
        owner.record_error(claim, f"boom {attempt}")
    exhausted = owner.claim("run", 6)
    assert isinstance(exhausted, Exhausted) and exhausted.errors == ["boom 1", "boom 2"]


def test_racing_threads_get_one_claim(tmp_path: Path) -> None:
    won: list[Claim] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        mine = store(tmp_path)
        barrier.wait()
        claim = mine.claim("run", 8)
        if isinstance(claim, Claim):
            won.append(claim)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1


@pytest.mark.integration
def test_s3_claims_are_conditional_puts(moto_server: MotoServer, s3_env: str) -> None:
    moto_server.create_bucket("eval-claims")
    storage = Storage(StorageConfig.model_validate({"s3": {"endpoint_url": s3_env}}))
    uri = "s3://eval-claims/ws/x.json"
    assert create_exclusive(storage, uri, b"first")
    assert not create_exclusive(storage, uri, b"second")
    assert storage.read_bytes(uri) == b"first"
    first, second = (store("s3://eval-claims/ws", storage=storage) for _ in range(2))
    assert first.claim("run", 2).attempt == 1 and second.claim("run", 2) is None
    assert first.finish("run", 2, {"status": "finished", "metrics": {}})
    assert list(second.done_steps("run")) == [2] and second.claim("run", 2) is None
    lease_lapses_then_both_finish("s3://eval-claims/lapsed", storage, slow_first=True)
