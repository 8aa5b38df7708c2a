"""Claims: exclusive creation, leases, retries and done records, on local disk and S3.

The S3 tests run against moto, through a loopback proxy that answers as AWS can and moto
does not: 409 ConditionalRequestConflict, 5xx, and late answers to applied writes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from evaluation import claims
from evaluation.claims import Claim, ClaimStore, Exhausted, Published
from infra import conditional_writes
from infra.conditional_writes import create_exclusive
from infra.services import MotoServer
from infra.storage import Storage, StorageConfig, StorageError
from tests.s3_fault_proxy import Fault, FaultProxy


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
    assert isinstance(taken, Claim) and taken.attempt == 2 and taken.lapsed == [1]


def test_the_heartbeat_keeps_a_slow_claim(tmp_path: Path) -> None:
    owner = store(tmp_path, lease_s=0.15)
    claim = owner.claim("run", 2)
    with owner.heartbeat(claim):
        time.sleep(0.4)  # longer than the lease: renewed meanwhile
        assert store(tmp_path).claim("run", 2) is None


def lease_lapses_then_both_finish(
    workspace: str, storage: Storage | None, slow_first: bool, lease_s: float = 0.05
) -> None:
    """A slow but live owner's lease lapses, a second sweep takes over; both finish. The
    first to publish wins, the other owner is told it lost, the record names the winner;
    until the done record is written, the result is held while the winner's lease is live
    and handed out for completion once it lapsed."""
    slow = store(workspace, lease_s=lease_s, storage=storage)
    taker = store(workspace, storage=storage)
    stale = slow.claim("run", 2)
    time.sleep(2 * lease_s + (2.2 if storage else 0))  # S3 stamps whole seconds
    taken = taker.claim("run", 2)
    assert isinstance(taken, Claim) and taken.attempt == 2 and taken.lapsed == [1]
    first, second = (
        ((slow, stale), (taker, taken)) if slow_first else ((taker, taken), (slow, stale))
    )
    won = first[0].publish(first[1], {"status": "finished", "metrics": {"m": 1.0}})
    assert won is not None and won["attempt"] == first[1].attempt
    assert second[0].publish(second[1], {"status": "finished", "metrics": {"m": 2.0}}) is None
    pending = taker.claim("run", 2)
    assert isinstance(pending, Published) if slow_first else pending is None
    assert first[0].finish("run", 2, won) and not second[0].finish("run", 2, won)
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


def test_a_result_left_without_done_record_is_handed_out_once_its_lease_lapses(
    tmp_path: Path,
) -> None:
    """The publisher died between ``result.json`` and ``done.json``: nobody re-evaluates
    the checkpoint; once its lease lapsed, a claim returns the result to complete."""
    dying = store(tmp_path, lease_s=0.05)
    claim = dying.claim("run", 2)
    published = dying.publish(claim, {"status": "finished", "metrics": {"m": 1.0}})
    other = store(tmp_path)
    time.sleep(0.1)
    handed = other.claim("run", 2)
    assert isinstance(handed, Published) and handed.record == published
    assert other.finish("run", 2, handed.record) and other.claim("run", 2) is None


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
    lease_lapses_then_both_finish("s3://eval-claims/lapsed", storage, True, lease_s=0.5)


@pytest.fixture
def proxy(moto_server: MotoServer, s3_env: str):
    with FaultProxy(moto_server.endpoint_url) as proxy:
        yield proxy


def through(proxy: FaultProxy, **settings: object) -> Storage:
    s3 = {"endpoint_url": proxy.url, "read_timeout_s": 1.0, "connect_timeout_s": 1.0}
    config = {"s3": s3, "retries": 4, "backoff_s": 0.05, **settings}
    return Storage(StorageConfig.model_validate(config))


@pytest.mark.integration
def test_a_409_conflict_is_a_lost_race_and_never_a_crash(
    moto_server: MotoServer, proxy: FaultProxy
) -> None:
    """AWS answers a conditional PUT that meets a concurrent one with 409
    ConditionalRequestConflict: the rival's object there means we lost, nothing there means
    the race is still open (tried again), our own bytes mean an earlier try of ours won."""
    moto_server.create_bucket("claims-409")
    storage = through(proxy)
    rival = "s3://claims-409/ws/rival.json"
    moto_server.s3_client().put_object(Bucket="claims-409", Key="ws/rival.json", Body=b"rival")
    proxy.inject(Fault(409, "ConditionalRequestConflict"))
    assert not create_exclusive(storage, rival, b"mine")
    assert storage.read_bytes(rival) == b"rival"

    proxy.inject(Fault(409, "ConditionalRequestConflict"), times=2)
    assert create_exclusive(storage, "s3://claims-409/ws/open.json", b"mine")
    assert proxy.count() == 4  # 1 + 3: two conflicts, then the PUT that created it

    # two sweeps race for attempt 1: the loser's PUT is answered 409, not 412
    first, second = (store("s3://claims-409/sweeps", storage=storage) for _ in range(2))
    listed = second.attempts("run", 2)  # what the loser saw before it tried: nothing
    assert isinstance(first.claim("run", 2), Claim) and listed == []
    proxy.inject(Fault(409, "ConditionalRequestConflict"))
    assert second.claim("run", 2) is None  # no crash, no second claim
    assert [a["owner"] for a in second.attempts("run", 2)] == [first.owner]


@pytest.mark.integration
def test_transient_s3_errors_are_retried_with_backoff_and_bounded(
    moto_server: MotoServer, proxy: FaultProxy
) -> None:
    moto_server.create_bucket("claims-5xx")
    storage = through(proxy)
    sweeps = store("s3://claims-5xx/ws", storage=storage)
    proxy.inject(Fault(500, "InternalError"), times=2)
    proxy.inject(Fault(503, "SlowDown"), times=1)
    claim = sweeps.claim("run", 2)
    assert isinstance(claim, Claim) and claim.attempt == 1
    assert proxy.count() == 4  # three answers of 5xx, then the PUT that created it

    every_get = lambda method, path, headers: method == "GET"  # noqa: E731
    proxy.inject(Fault(500, "InternalError"), times=2, match=every_get)
    assert sweeps.attempts("run", 2)[0]["owner"] == sweeps.owner  # reads are retried too

    proxy.inject(Fault(500, "InternalError"), times=-1)
    started, before = time.monotonic(), proxy.count()
    with pytest.raises(StorageError, match="after 4 attempts"):
        create_exclusive(storage, "s3://claims-5xx/ws/never.json", b"x")
    assert proxy.count() - before == 4 and time.monotonic() - started < 10


@pytest.mark.integration
def test_a_lost_answer_to_an_applied_put_still_wins_the_claim(
    moto_server: MotoServer, proxy: FaultProxy
) -> None:
    """The endpoint applies the conditional PUT but answers after the client's read timeout:
    the retry meets our own object (412), which is a win, not a lost race."""
    moto_server.create_bucket("claims-slow")
    storage = through(proxy)
    sweeps = store("s3://claims-slow/ws", storage=storage)
    proxy.inject(Fault(delay_s=2.5, forward=True))
    claim = sweeps.claim("run", 2)
    assert isinstance(claim, Claim) and claim.attempt == 1
    assert proxy.count() >= 2  # the late answer, then the retry that found our object
    assert [a["owner"] for a in sweeps.attempts("run", 2)] == [sweeps.owner]


class SkewedClock:
    """A stand-in for the ``time`` module whose ``time()`` is off by ``offset_s``."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def time(self) -> float:
        return time.time() + self.offset_s

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@pytest.mark.integration
@pytest.mark.parametrize("skewed", ["reader", "writer"])
def test_a_lease_is_judged_by_the_stores_clock(
    moto_server: MotoServer, s3_env: str, monkeypatch: pytest.MonkeyPatch, skewed: str
) -> None:
    """A sweep whose clock runs an hour ahead does not take over a live claim, and one
    whose clock runs an hour behind does not write a lease that is lapsed on arrival; the
    lease lapses when the store says it went unrenewed for ``lease_s``."""
    bucket = f"claims-clock-{skewed}"
    moto_server.create_bucket(bucket)
    storage = Storage(StorageConfig.model_validate({"s3": {"endpoint_url": s3_env}}))
    workspace = f"s3://{bucket}/ws"
    owner = store(workspace, lease_s=2.0, storage=storage)
    reader = store(workspace, storage=storage)
    offset = 3600.0 if skewed == "reader" else -3600.0
    for module in (claims, conditional_writes):
        monkeypatch.setattr(module, "time", SkewedClock(offset if skewed == "writer" else 0.0))
    claim = owner.claim("run", 2)
    for module in (claims, conditional_writes):
        monkeypatch.setattr(module, "time", SkewedClock(offset if skewed == "reader" else 0.0))
    assert isinstance(claim, Claim) and reader.claim("run", 2) is None
    time.sleep(4.2)  # two seconds of lease, one of timestamp resolution, one of margin
    taken = reader.claim("run", 2)
    assert isinstance(taken, Claim) and taken.attempt == 2 and taken.lapsed == [1]
