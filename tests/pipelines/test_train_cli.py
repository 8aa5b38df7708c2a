"""``omni train`` as a user meets it before any training: help and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from typer.testing import CliRunner

from infra.tracking import open_experiment
from pipelines.cli import app
from pipelines.config import PipelineConfig
from pipelines.train.inputs import TrainInputs
from pipelines.train.stage import create_run
from tests.pipelines.test_cli import plain
from training.train_config import ModelSection, TrainConfig

runner = CliRunner()


def config_file(tmp_path: Path, **sections: dict) -> Path:
    path = tmp_path / "config.yaml"
    corpus = {"inputs": [{"uri": "x.jsonl", "format": "jsonl"}]}
    path.write_text(json.dumps({"workspace": str(tmp_path / "ws"), "corpus": corpus, **sections}))
    return path


def one_error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


def test_help_lists_every_model_and_train_setting() -> None:
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    text = plain(result.output)
    assert result.exit_code == 0 and "--resume" in text and "Exit codes" in text
    for name in TrainConfig.model_fields:
        assert f"train.{name}" in text
    for name in ModelSection.model_fields:
        assert f"model.{name}" in text


def test_no_token_shards_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--config", str(config_file(tmp_path))])
    assert result.exit_code == 1
    assert "omni pretokenize" in one_error_line(result.output)
    assert not (tmp_path / "ws").exists()


def test_a_bad_train_key_exits_2_naming_it(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    result = runner.invoke(app, ["train", "--config", str(path), "--set", "train.max_step=3"])
    assert result.exit_code == 2 and "train.max_step: unknown key" in result.output
    result = runner.invoke(app, ["train", "--config", str(path), "--set", "model.size=huge"])
    assert result.exit_code == 2 and "model.size" in result.output


def test_an_unknown_run_id_is_one_line(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    result = runner.invoke(app, ["train", "--config", str(path), "--resume", "0" * 32])
    assert result.exit_code == 1
    assert "unknown run id" in one_error_line(result.output)


def logged_run(tmp_path: Path, **train: object) -> str:
    """An MLflow run made the way ``omni train`` makes one, with no checkpoint yet."""
    data = json.loads(config_file(tmp_path, train=train).read_text())
    config = PipelineConfig.model_validate(data)
    client, experiment = open_experiment(config.mlflow, config.workspace)
    inputs = TrainInputs({}, {}, {}, {}, {}, {"image": np.zeros(1)}, "data", "layout")
    return create_run(client, experiment, config, inputs)


def test_resume_refuses_a_contradicting_set_and_a_run_without_checkpoint(tmp_path: Path) -> None:
    run_id = logged_run(tmp_path, lr=0.001)
    path = config_file(tmp_path)
    args = ["train", "--config", str(path), "--resume", run_id]
    result = runner.invoke(app, [*args, "--set", "train.lr=0.01"])
    assert result.exit_code == 2
    assert "train.lr" in one_error_line(result.output)
    same = runner.invoke(app, [*args, "--set", "train.lr=0.001"])
    assert same.exit_code == 1
    assert "no complete checkpoint" in one_error_line(same.output)
    client = MlflowClient(f"sqlite:///{tmp_path / 'ws' / 'mlflow' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "RUNNING"  # untouched by the refusals
