"""The workflow engine with injected stages: skip-if-done, invalidation, retries, plan.

No Ray and no real stage: each toy stage writes a ``_SUCCESS.json`` whose fingerprint
chains its parameter and its upstream fingerprints, as the real stages do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from infra.config import ConfigError, fingerprint
from infra.storage import Storage, StorageConfig, StorageError
from pipelines.stage_state import SUCCESS, write_marker
from pipelines.workflow import run as workflow
from pipelines.workflow.config import WorkflowConfig
from pipelines.workflow.run import Stage, is_transient
from pipelines.workflow.status import stage_statuses


class ToyPipeline:
    """Stages a -> b -> c; ``fail[name]`` is a list of errors raised by the next calls."""

    def __init__(self, workspace: Path) -> None:
        self.config = SimpleNamespace(
            workspace=str(workspace),
            storage=StorageConfig(),
            workflow=WorkflowConfig(retries=2, backoff_s=0.5),
            params={"a": 1, "b": 1, "c": 1},
        )
        self.calls: list[str] = []
        self.fail: dict[str, list[BaseException]] = {}
        self.sleeps: list[float] = []
        upstream = {"a": (), "b": ("a",), "c": ("b",)}
        self.stages = [
            Stage(
                name,
                upstream[name],
                self._runner(name),
                name,
                self._fingerprinter(name),
                describe=lambda marker, report: f"made {marker['fingerprint']}",
            )
            for name in "abc"
        ]

    def _fingerprinter(self, name: str) -> Any:
        def expected(config: Any, storage: Storage, markers: dict) -> str | None:
            ups = [s for s in self.stages if s.name == name][0].upstream
            if any(markers.get(u) is None for u in ups):
                return None
            return fingerprint(name, config.params[name], [markers[u]["fingerprint"] for u in ups])

        return expected

    def _runner(self, name: str) -> Any:
        def run(config: Any) -> str:
            self.calls.append(name)
            if self.fail.get(name):
                raise self.fail[name].pop(0)
            storage = Storage(config.storage)
            markers = workflow.read_markers(config, self.stages, storage)
            expected = self._fingerprinter(name)(config, storage, markers)
            write_marker(
                storage,
                f"{config.workspace}/{name}",
                SUCCESS,
                {"fingerprint": expected, "seconds": 1.5},
            )
            return name

        return run

    def run(self, **options: Any) -> workflow.WorkflowReport:
        return workflow.run(self.config, self.stages, sleep=self.sleeps.append, **options)


def statuses(report: workflow.WorkflowReport) -> dict[str, str]:
    return {o.stage: o.status for o in report.outcomes}


@pytest.fixture
def toy(tmp_path: Path) -> ToyPipeline:
    return ToyPipeline(tmp_path / "ws")


def test_a_finished_pipeline_is_skipped_whole(toy: ToyPipeline) -> None:
    first = toy.run()
    assert statuses(first) == {"a": "done", "b": "done", "c": "done"}
    assert toy.calls == ["a", "b", "c"]
    again = toy.run()
    assert statuses(again) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert toy.calls == ["a", "b", "c"]  # nothing ran a second time
    assert all(o.produced.startswith("made ") for o in again.outcomes)
    assert [p.reason.split(" with")[0] for p in again.plans] == ["done"] * 3


def test_a_changed_stage_invalidates_everything_below_it(toy: ToyPipeline) -> None:
    toy.run()
    toy.config.params["b"] = 2
    storage = Storage(toy.config.storage)
    plans = {p.stage: p for p in workflow.plan(toy.config, toy.stages, storage)}
    assert plans["a"].action == "skip"
    assert plans["b"].action == "run" and "config or inputs changed" in plans["b"].reason
    assert plans["c"].action == "run" and plans["c"].reason == "upstream b runs first"
    toy.calls.clear()
    report = toy.run()
    assert toy.calls == ["b", "c"]
    assert statuses(report) == {"a": "skipped", "b": "done", "c": "done"}
    assert [p.action for p in workflow.plan(toy.config, toy.stages, storage)] == ["skip"] * 3


def test_stages_that_use_ray_share_one_session_opened_only_when_needed(
    toy: ToyPipeline,
) -> None:
    """Ray restarted in one process segfaults at exit (ray-project/ray#31145): one session."""
    toy.stages = [dataclasses.replace(s, uses_ray=s.name != "a") for s in toy.stages]

    @contextlib.contextmanager
    def session() -> Iterator[None]:
        toy.calls.append("ray up")
        yield
        toy.calls.append("ray down")

    toy.run(ray_session=session)
    assert toy.calls == ["a", "ray up", "b", "c", "ray down"]
    toy.calls.clear()
    toy.run(ray_session=session)  # all done: nothing starts Ray
    assert toy.calls == []
    toy.config.params["a"] = 2
    toy.run(ray_session=session, only="a")
    assert toy.calls == ["a"]


def test_a_transient_error_is_retried_with_backoff(toy: ToyPipeline) -> None:
    toy.fail["b"] = [ConnectionResetError("reset by peer"), _storage_error_after_retries()]
    report = toy.run()
    b = report.outcomes[1]
    assert (b.status, b.attempts) == ("done", 3)
    assert toy.calls == ["a", "b", "b", "b", "c"]
    assert toy.sleeps == [0.5, 1.0]
    record = workflow.read_state(Storage(), toy.config.workspace, "b")
    assert record["state"] == "done" and record["attempt"] == 3


def test_retries_are_bounded(toy: ToyPipeline) -> None:
    toy.fail["a"] = [ConnectionResetError("reset")] * 5
    report = toy.run()
    assert statuses(report) == {"a": "failed", "b": "not run", "c": "not run"}
    assert report.outcomes[0].attempts == 3 and report.outcomes[0].transient


def test_a_config_error_is_not_retried(toy: ToyPipeline) -> None:
    toy.fail["b"] = [ConfigError("config.yaml: b.size: Input should be greater than 0 (got -1)")]
    report = toy.run()
    assert statuses(report) == {"a": "done", "b": "failed", "c": "not run"}
    assert toy.calls == ["a", "b"] and toy.sleeps == []
    failed = report.failed
    assert failed is not None and failed.attempts == 1 and not failed.transient
    assert failed.reason == "config.yaml: b.size: Input should be greater than 0 (got -1)"
    record = workflow.read_state(Storage(), toy.config.workspace, "b")
    assert record["state"] == "failed" and record["error_class"] == "ConfigError"
    rows = {row.stage: row for row in stage_statuses(toy.config, toy.stages)}
    assert (rows["a"].state, rows["a"].seconds) == ("done", 1.5)
    assert rows["b"].state == "failed" and "b.size" in rows["b"].reason
    assert rows["c"].state == "pending" and rows["c"].reason == "upstream b runs first"


def _storage_error_after_retries() -> StorageError:
    try:
        try:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        except EndpointConnectionError as exc:
            raise StorageError("cannot reach S3 endpoint after 3 attempts") from exc
    except StorageError as wrapped:
        return wrapped


def _s3_error(status: int) -> ClientError:
    response = {"Error": {"Code": "X"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


def test_the_error_class_decides_not_the_message() -> None:
    from ray.exceptions import ActorDiedError, NodeDiedError, WorkerCrashedError

    for error in (
        ConnectionResetError(),
        TimeoutError(),
        _storage_error_after_retries(),
        _s3_error(503),
        ActorDiedError(),
        NodeDiedError("n"),
        WorkerCrashedError(),
    ):
        assert is_transient(error), error
    # A message that reads transient changes nothing: the class is a user error.
    for error in (
        ConfigError("connection reset"),
        FileNotFoundError("timeout"),
        StorageError("no AWS credentials"),
        _s3_error(403),
        RuntimeError("reset"),
    ):
        assert not is_transient(error), error
    try:
        raise FileNotFoundError("corpus.inputs[0].uri: no such file") from ConnectionResetError()
    except FileNotFoundError as user_error:
        assert not is_transient(user_error)


def test_from_and_only_select_stages(toy: ToyPipeline) -> None:
    report = toy.run(only="a")
    assert statuses(report) == {"a": "done", "b": "unselected", "c": "unselected"}
    report = toy.run(start="b")
    assert statuses(report) == {"a": "unselected", "b": "done", "c": "done"}
    assert report.plans[0].reason == "not selected (done)"
    with pytest.raises(ConfigError, match="--only x: no such stage; stages: a, b, c"):
        toy.run(only="x")


def test_a_stage_whose_code_is_missing_is_pending(toy: ToyPipeline) -> None:
    missing = Stage("d", ("c",), lambda config: None, available=lambda: "pending: d not built")
    report = workflow.run(toy.config, [*toy.stages, missing], sleep=toy.sleeps.append)
    assert report.outcomes[-1].status == "pending"
    assert report.outcomes[-1].reason == "pending: d not built" and report.failed is None


def test_status_names_the_ray_job_of_a_stage(toy: ToyPipeline) -> None:
    toy.run(only="a")
    job = SimpleNamespace(
        submission_id="omni-a-123",
        status="SUCCEEDED",
        start_time=1,
        message="",
        metadata={"omni.stage": "a", "omni.workspace": toy.config.workspace},
    )
    other = SimpleNamespace(
        **{
            **vars(job),
            "submission_id": "x",
            "metadata": {"omni.stage": "a", "omni.workspace": "/else"},
        }
    )
    rows = stage_statuses(toy.config, toy.stages, [job, other])
    assert (rows[0].ray_job_id, rows[0].ray_job_status) == ("omni-a-123", "SUCCEEDED")
    assert rows[1].ray_job_id is None
    assert json.dumps([r.as_dict() for r in rows])


def test_a_stage_without_markers_is_tracked_by_the_workflow_record(toy: ToyPipeline) -> None:
    calls: list[str] = []

    def expected(config: Any, storage: Storage, markers: dict) -> str | None:
        return fingerprint("d", markers["c"]["fingerprint"]) if markers.get("c") else None

    sweep = Stage("d", ("c",), lambda config: calls.append("d"), fingerprint=expected)
    stages = [*toy.stages, sweep]
    assert statuses(workflow.run(toy.config, stages))["d"] == "done"
    assert statuses(workflow.run(toy.config, stages))["d"] == "skipped" and calls == ["d"]
    toy.config.params["c"] = 5  # upstream changes: the record no longer matches
    assert statuses(workflow.run(toy.config, stages))["d"] == "done" and calls == ["d", "d"]
