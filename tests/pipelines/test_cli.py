"""The ``omni`` command line as a user meets it: help, summaries, one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.shard import ShardConfig

runner = CliRunner()


def plain(text: str) -> str:
    """Help text without colour codes and box drawing, whitespace collapsed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def config_file(tmp_path: Path, inputs: list[dict], **sections: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"workspace": str(tmp_path / "ws"), "corpus": {"inputs": inputs},
                                **sections}))  # fmt: skip
    return path


def test_help_lists_commands_and_every_shard_setting() -> None:
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "shard" in plain(top.output)
    result = runner.invoke(app, ["shard", "--help"], env={"COLUMNS": "200"})
    text = plain(result.output)
    assert result.exit_code == 0
    assert "--config" in text and "--set" in text and "Exit codes" in text
    for name in ShardConfig.model_fields:
        assert f"shard.{name}" in text


def test_invalid_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    path = config_file(tmp_path, [{"uri": "x.jsonl", "format": "jsonl"}])
    result = runner.invoke(app, ["shard", "-c", str(path), "--set", "shard.target_tokens=zero"])
    assert result.exit_code == 2
    assert "shard.target_tokens" in result.output and "zero" in result.output
    assert "Traceback" not in result.output


def test_missing_input_exits_1_with_one_line(tmp_path: Path) -> None:
    path = config_file(tmp_path, [{"uri": str(tmp_path / "none.jsonl"), "format": "jsonl"}])
    result = runner.invoke(app, ["shard", "-c", str(path)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "corpus.inputs[0].uri: no such file" in lines[0]


@pytest.mark.integration
def test_unreachable_s3_exits_1_with_one_line(tmp_path: Path, s3_env: str) -> None:
    path = config_file(
        tmp_path,
        [{"uri": "s3://bucket/docs.jsonl", "format": "jsonl"}],
        storage={"s3": {"endpoint_url": "http://127.0.0.1:9"}, "retries": 1},
    )
    result = runner.invoke(app, ["shard", "-c", str(path)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach S3 endpoint http://127.0.0.1:9" in lines[0]


@pytest.mark.integration
def test_successful_run_prints_the_summary(
    ray_cluster: None, sample_corpus: Path, tmp_path: Path
) -> None:
    path = config_file(tmp_path, [{"uri": str(sample_corpus / "docs.jsonl"), "format": "jsonl"}],
                       shard={"target_tokens": 8000})  # fmt: skip
    result = runner.invoke(app, ["shard", "-c", str(path)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    assert "omni shard: done" in text and "documents out 374" in text
    assert "image+text 52" in text
    again = runner.invoke(app, ["shard", "-c", str(path)])
    assert "skipped (already done)" in plain(again.output)
