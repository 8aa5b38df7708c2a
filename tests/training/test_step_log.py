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


def test_a_reopened_log_skips_the_steps_already_logged(run: tuple[str, str]) -> None:
    """A worker group restarted from a checkpoint recomputes steps MLflow already has."""
    uri, run_id = run
    first = StepLog(uri, run_id)
    assert [first.log(step, {"train/loss": 1.0 / step}) for step in (1, 2, 3)] == [True] * 3
    first.close()
    again = StepLog(uri, run_id)  # as after a restart from step 1's checkpoint
    try:
        assert again.last_logged == 3
        assert [again.log(step, {"train/loss": 9.0}) for step in (2, 3, 4)] == [False, False, True]
        again.flush()
    finally:
        again.close()
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 9.0)]
