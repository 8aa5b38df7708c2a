"""The ``omni`` command line as a user meets it: help, summaries, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from infra.services import MotoServer
from pipelines.cli import app
from pipelines.shard.stage import ShardConfig, ShardReport
from pipelines.summary import render_shard_report
from tests.conftest import REPO

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


@pytest.mark.integration
def test_s3_without_credentials_exits_1_with_one_line(
    tmp_path: Path, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reachable endpoint, no credentials anywhere: one line naming the URI and where
    credentials are read from, not a botocore traceback. A fresh process, so no cached
    S3 client of another test can hold credentials."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    empty = tmp_path / "empty-aws-file"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups
    monkeypatch.setenv("COLUMNS", "80")  # the line must not be wrapped even when narrow
    path = config_file(
        tmp_path,
        [{"uri": "s3://raw/docs.jsonl", "format": "jsonl"}],
        storage={"s3": {"endpoint_url": moto_server.endpoint_url}},
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "shard", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "no AWS credentials for s3://raw/docs.jsonl" in lines[0]
    assert "AWS_ACCESS_KEY_ID" in lines[0] and "AWS_PROFILE" in lines[0]
    assert "Traceback" not in done.stderr


def test_the_shard_summary_counts_dropped_text_segments_and_shows_input_notes() -> None:
    report = ShardReport(
        stage_dir="ws/shards", skipped=False, documents_in=3, documents_out=2, shards=1,
        quarantined={"no_segments": 1}, signatures={"image": 2}, est_tokens=512, seconds=1.0,
        empty_text_segments=4, notes=["raw/00000.tar: not in WebDataset order"],
    )  # fmt: skip
    console = Console(record=True, width=120)
    render_shard_report(report, console)
    text = plain(console.export_text())
    assert "empty text segments dropped 4" in text
    assert "note: raw/00000.tar: not in WebDataset order" in text
