"""Rank 0's MLflow writer: tags survive a crash between a checkpoint's marker and its tag."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from training.step_log import StepLog


@pytest.fixture
def run(tmp_path: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    return uri, client.create_run(experiment).info.run_id


def test_delete_tag_removes_a_tag_and_tolerates_one_never_set(run: tuple[str, str]) -> None:
    uri, run_id = run
    log = StepLog(uri, run_id)
    try:
        log.set_tag("checkpoint.step-0000010", "ckpt/10")
        log.delete_tag("checkpoint.step-0000010")
        log.delete_tag("checkpoint.step-0000005")  # its run was killed before tagging it
        assert "checkpoint.step-0000010" not in MlflowClient(uri).get_run(run_id).data.tags
    finally:
        log.close()


def test_delete_tag_still_raises_other_errors(run: tuple[str, str]) -> None:
    uri, run_id = run
    log = StepLog(uri, run_id)
    try:
        MlflowClient(uri).set_terminated(run_id)
        MlflowClient(uri).delete_run(run_id)  # a deleted run refuses writes
        with pytest.raises(MlflowException):
            log.delete_tag("checkpoint.step-0000005")
    finally:
        log.close()
