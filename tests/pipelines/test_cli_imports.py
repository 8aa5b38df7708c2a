"""``omni --help``, every ``omni ... --help`` and ``omni status`` answer without loading
torch, transformers, DeepSpeed, Ray or MLflow (seconds each): checked in fresh processes
through ``sys.modules``, the only place an import cannot hide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from infra.storage import Storage
from pipelines.config import load_pipeline_config
from pipelines.workflow.dag import pipeline_stages
from pipelines.workflow.run import state_uri
from tests.conftest import REPO, SAMPLE_CORPUS

HEAVY = ("torch", "transformers", "deepspeed", "ray", "mlflow")
# --help needs no data library either: each costs a good part of the 1 s budget.
HEAVY_FOR_HELP = (*HEAVY, "numpy", "pyarrow")

# Runs in a fresh interpreter: prints the command paths it rendered, their exit codes and
# the heavy modules loaded by then.
HELP_SCRIPT = """
import json, sys
from typer.main import get_command
from typer.testing import CliRunner
from pipelines.cli import app

def paths(command, prefix):
    yield prefix
    if hasattr(command, "commands"):  # a group (typer ships its own click)
        for name, sub in command.commands.items():
            yield from paths(sub, [*prefix, name])

runner = CliRunner()
rendered = {}
for path in paths(get_command(app), []):
    result = runner.invoke(app, [*path, "--help"])
    rendered[" ".join(path)] = [result.exit_code, "Usage" in result.output]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1].split(","))
print(json.dumps({"rendered": rendered, "heavy": heavy}))
"""

STATUS_SCRIPT = """
import json, sys
from typer.testing import CliRunner
from pipelines.cli import app

result = CliRunner().invoke(app, ["status", "--config", sys.argv[2], "--json"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1].split(","))
print(json.dumps({"exit_code": result.exit_code, "output": result.output, "heavy": heavy}))
"""


def run_fresh(script: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_every_help_of_the_cli_loads_no_heavy_module() -> None:
    result = run_fresh(HELP_SCRIPT, ",".join(HEAVY_FOR_HELP))
    rendered = result["rendered"]
    expected = {"", "shard", "pretokenize", "train", "tokenizers", "tokenizers train",
                "tokenizers eval", "run", "submit", "status", "eval", "eval compare",
                "generate", "sweep"}  # fmt: skip
    assert expected <= set(rendered), sorted(rendered)
    assert all(code == 0 and usage for code, usage in rendered.values()), rendered
    assert result["heavy"] == [], result["heavy"]


def finished_workspace(tmp_path: Path) -> Path:
    """A config whose workspace has every stage done for it: the markers a real run leaves,
    with the fingerprints the plan expects (read from the stage DAG itself), and the token
    manifest the train fingerprint covers. No stage runs."""
    path = tmp_path / "config.yaml"
    inputs = [{"uri": str(SAMPLE_CORPUS / "docs.jsonl"), "format": "jsonl"}]
    path.write_text(json.dumps({"workspace": str(tmp_path / "ws"), "corpus": {"inputs": inputs}}))
    config, storage = load_pipeline_config(path), Storage()
    tokens = tmp_path / "ws" / "tokens"
    tokens.mkdir(parents=True)
    manifest = [{"bucket": "text", "path": "text/000000.tar", "samples": 7}]
    pq.write_table(pa.Table.from_pylist(manifest), tokens / "manifest.parquet")
    payloads = {
        "shard": {"documents_out": 7, "shards": 1, "quarantined": {}},
        "tokenizers": {"vocab_size": 300, "steps": {"image": 2}},
        "pretokenize": {"buckets": {"text": {"samples": 7}}, "tars": 1},
        "train": {"run_id": "0123abcd", "step": 4},
    }
    markers: dict = {}
    for stage in pipeline_stages():
        fingerprint = stage.fingerprint(config, storage, markers)
        assert fingerprint is not None, stage.name
        if stage.directory is None:  # eval: the workflow's record stands for a marker
            record = {"state": "done", "fingerprint": fingerprint}
            storage.write_bytes(state_uri(str(tmp_path / "ws"), stage.name),
                                json.dumps(record).encode())  # fmt: skip
            continue
        markers[stage.name] = {**payloads[stage.name], "fingerprint": fingerprint}
        folder = tmp_path / "ws" / stage.directory
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "_SUCCESS.json").write_text(json.dumps(markers[stage.name]))
    return path


def test_status_of_a_finished_workspace_loads_no_heavy_module(tmp_path: Path) -> None:
    result = run_fresh(STATUS_SCRIPT, ",".join(HEAVY), str(finished_workspace(tmp_path)))
    assert result["exit_code"] == 0, result["output"]
    rows = json.loads(result["output"])
    assert {row["stage"]: row["state"] for row in rows} == dict.fromkeys(
        ["shard", "tokenizers", "pretokenize", "train", "eval"], "done"
    )
    assert rows[3]["produced"] == "MLflow run 0123abcd, step 4"
    assert result["heavy"] == [], result["heavy"]
