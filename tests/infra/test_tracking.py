"""MLflow tracking against a local SQLite store and a real `mlflow server`."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pydantic import SecretStr

from infra.config import Section
from infra.services import MlflowServer
from infra.tracking import MlflowConfig, flatten, local_store, seed_local_store, tracked_run


class Secretive(Section):
    token: SecretStr = SecretStr("hunter2")
    endpoint: str = "http://user:pa55@127.0.0.1:9000"
    nested: dict = {"lr": 3e-4}


def test_flatten_nests_with_dots() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2]}) == {
        "a.b": "1", "a.c.d": "x", "e": "[1, 2]"
    }  # fmt: skip


def test_remote_workspace_needs_a_tracking_uri() -> None:
    with pytest.raises(ValueError, match="mlflow.tracking_uri must be set"):
        local_store("s3://bucket/ws")


def read_run(uri: str, run_id: str):
    return MlflowClient(tracking_uri=uri).get_run(run_id)


def test_local_store_run_with_params_metrics_artifacts(tmp_path: Path) -> None:
    config = MlflowConfig(experiment="unit")
    with tracked_run(config, str(tmp_path), "warmup", {"stage": "tokenizers"}) as tracker:
        tracker.log_params(Secretive(), prefix="cfg.")
        tracker.log_metrics({"loss": 1.5}, step=0)
        tracker.log_metrics({"loss": 0.5}, step=1)
        tracker.log_bytes(b"\x89PNG fake", "grid.png", "images")
    uri, _ = local_store(str(tmp_path))
    run = read_run(uri, tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "tokenizers"
    assert run.data.params["cfg.token"] == "***"
    assert run.data.params["cfg.endpoint"] == "http://***@127.0.0.1:9000"
    assert "hunter2" not in str(run.data.params) and "pa55" not in str(run.data.params)
    assert run.data.metrics["loss"] == 0.5
    history = MlflowClient(tracking_uri=uri).get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.5), (1, 0.5)]
    artifacts = MlflowClient(tracking_uri=uri).list_artifacts(tracker.run_id, "images")
    assert [a.path for a in artifacts] == ["images/grid.png"]
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()


def test_a_failing_run_is_marked_failed(tmp_path: Path) -> None:
    config = MlflowConfig(experiment="unit")
    with pytest.raises(RuntimeError), tracked_run(config, str(tmp_path), "boom") as tracker:
        raise RuntimeError("crash")
    assert read_run(local_store(str(tmp_path))[0], tracker.run_id).info.status == "FAILED"


def test_new_local_stores_are_copies_of_one_migrated_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = MlflowConfig(experiment="unit")
    for workspace in ("a", "b"):
        with tracked_run(config, str(tmp_path / workspace), "r") as tracker:
            tracker.log_metrics({"loss": 1.0}, step=0)
        client = MlflowClient(tracking_uri=local_store(str(tmp_path / workspace))[0])
        assert client.get_run(tracker.run_id).data.metrics == {"loss": 1.0}
        default = client.get_experiment("0")  # MLflow's own, added on first open
        assert default.name == "Default"
        assert (
            client.get_experiment_by_name("unit").artifact_location
            == (tmp_path / workspace / "mlflow" / "artifacts").as_uri()
        )
    (template,) = (tmp_path / "cache" / "omni").glob("mlflow-*-empty.db")
    with closing(sqlite3.connect(template)) as db:
        assert db.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM alembic_version").fetchone() == (1,)
    assert sorted(p.name for p in (tmp_path / "b" / "mlflow").iterdir()) == ["mlflow.db"]


def test_an_existing_local_store_is_never_replaced(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"a store another process made")
    seed_local_store(store)
    assert store.read_bytes() == b"a store another process made"


@pytest.mark.integration
def test_runs_reach_a_real_mlflow_server(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    config = MlflowConfig(tracking_uri=mlflow_server.tracking_uri, experiment="server-tracking")
    with tracked_run(config, str(tmp_path), "remote") as tracker:
        tracker.log_metrics({"psnr": 21.5}, step=3)
        tracker.log_bytes(b"{}", "report.json")
    run = read_run(mlflow_server.tracking_uri, tracker.run_id)
    assert run.data.metrics["psnr"] == 21.5
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["report.json"]
    assert not (tmp_path / "mlflow").exists()  # nothing local when a server is configured
