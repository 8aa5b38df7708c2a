"""``omni run --dry-run`` and ``omni status`` on the real stage DAG, without running a stage."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from infra.storage import Storage
from pipelines.cli import app
from pipelines.config import load_pipeline_config
from pipelines.train.fingerprints import data_fingerprint, expected_fingerprint
from pipelines.workflow import run as workflow
from pipelines.workflow.dag import pipeline_stages
from tests.conftest import SAMPLE_CORPUS

runner = CliRunner()


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    inputs = [{"uri": str(SAMPLE_CORPUS / "docs.jsonl"), "format": "jsonl"}]
    path.write_text(json.dumps({"workspace": str(tmp_path / "ws"), "corpus": {"inputs": inputs}}))
    return path


def test_dry_run_prints_each_stage_with_its_reason(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["run", "-c", str(config_file(tmp_path)), "--dry-run"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    lines = {
        line.split("│")[1].strip(): line
        for line in result.output.splitlines()
        if line.count("│") == 4
    }
    assert "run" in lines["shard"] and "no output yet" in lines["shard"]
    assert "upstream shard runs first" in lines["tokenizers"]
    assert "upstream pretokenize runs first" in lines["train"]
    assert "pipelines.eval.stage" in lines["eval"] or "upstream train" in lines["eval"]
    assert not (tmp_path / "ws" / "shards").exists()  # a dry run writes nothing


def test_unknown_stage_and_bad_config_exit_2(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    result = runner.invoke(app, ["run", "-c", str(path), "--only", "nope", "--dry-run"])
    assert result.exit_code == 2 and "--only nope: no such stage" in result.output
    result = runner.invoke(app, ["run", "-c", str(path), "--set", "workflow.retries=-1"])
    assert result.exit_code == 2 and "workflow.retries" in result.output


def test_status_of_a_fresh_workspace_is_all_pending(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "-c", str(config_file(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [row["stage"] for row in rows] == ["shard", "tokenizers", "pretokenize", "train", "eval"]
    assert {row["state"] for row in rows} == {"pending"}


def test_the_plan_expects_the_fingerprint_the_train_stage_writes(tmp_path: Path) -> None:
    """The plan's train fingerprint is ``pipelines.train.fingerprints.expected_fingerprint``
    (what ``omni train`` writes): a train setting changes both, an eval setting neither."""
    path = config_file(tmp_path)
    tokens = tmp_path / "ws" / "tokens"
    tokens.mkdir(parents=True)
    (tokens / "_SUCCESS.json").write_text(json.dumps({"fingerprint": "tok-1"}))
    manifest = [{"bucket": "text", "path": "text/000000.tar", "samples": 7}]
    pq.write_table(pa.Table.from_pylist(manifest), tokens / "manifest.parquet")

    def planned(*overrides: str) -> tuple[str | None, str]:
        config = load_pipeline_config(path, list(overrides))
        plans = workflow.plan(config, pipeline_stages(), Storage(), only="train")
        [train] = [p for p in plans if p.stage == "train"]
        return train.fingerprint, expected_fingerprint(config, data_fingerprint("tok-1", manifest))

    base, base_written = planned()
    changed, changed_written = planned("train.max_steps=70")
    assert base == base_written and changed == changed_written and base != changed
    assert planned("eval.sweep.max_attempts=5")[0] == base


def test_the_plan_expects_the_fingerprint_the_shard_stage_writes(tmp_path: Path) -> None:
    """``shard.expected_fingerprint`` on both sides (the submit test sees a real stage
    write the planned value): a shard setting changes it."""
    from pipelines.corpus import expand_inputs
    from pipelines.shard import stage as shard

    path = config_file(tmp_path)

    def planned(*overrides: str) -> tuple[str | None, str]:
        config = load_pipeline_config(path, list(overrides))
        [step] = workflow.plan(config, pipeline_stages(), Storage(), only="shard")[:1]
        files = expand_inputs(config.corpus, Storage())
        return step.fingerprint, shard.expected_fingerprint(config, files)

    base, base_written = planned()
    changed, changed_written = planned("shard.target_tokens=3000")
    assert base == base_written and changed == changed_written and base != changed
