"""The workflow's driver-side stages (tokenizer warm-up, evaluation sweep) run where the
config says: on a cluster as Ray tasks holding ``workflow.tokenizers`` / ``workflow.eval``
resources, GPU included, not in the driver; with a local Ray in the driver itself.

The cluster is a real Ray instance in a subprocess declaring one (logical) GPU; the stage
functions are replaced by probes that report their process and the resources they hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.workflow import dag as stage_dag
from tests.conftest import REPO, SAMPLE_CORPUS, pipeline_config
from tests.pipelines import placement_probe

SCRIPT = """
import json, os, sys, ray
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
from pipelines.tokenizers import stage as tokenizers_stage
from pipelines.workflow import dag as stage_dag
from pipelines.config import load_pipeline_config
from tests.pipelines import placement_probe
tokenizers_stage.run = placement_probe.where
stage_dag._sweep_run = placement_probe.sweep
config = load_pipeline_config(sys.argv[1])
warmup = stage_dag._run_tokenizers(config)
sweep = stage_dag._run_eval(config).sweep.where
print("PLACED", json.dumps({"driver": os.getpid(), "tokenizers": warmup, "eval": sweep}))
"""


def config_file(tmp_path: Path, address: str | None) -> Path:
    config = pipeline_config(
        tmp_path / "ws",
        [{"uri": str(SAMPLE_CORPUS / "docs.jsonl"), "format": "jsonl"}],
        ray={"address": address},
        workflow={"tokenizers": {"num_cpus": 1, "num_gpus": 1}, "eval": {"num_cpus": 0.5}},
    )
    (tmp_path / "ws" / "train").mkdir(parents=True)
    (tmp_path / "ws" / "train" / "_SUCCESS.json").write_text(json.dumps({"run_id": "r1"}))
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    return path


@pytest.mark.integration
def test_on_a_cluster_they_run_as_ray_tasks_with_the_configured_resources(tmp_path: Path) -> None:
    path = config_file(tmp_path, "auto")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [x for x in done.stdout.splitlines() if x.startswith("PLACED ")]
    placed = json.loads(line.removeprefix("PLACED "))
    warmup, sweep = placed["tokenizers"], placed["eval"]
    assert warmup["pid"] != placed["driver"] and sweep["pid"] != placed["driver"]
    assert warmup["resources"] == {"CPU": 1.0, "GPU": 1.0}
    assert sweep["resources"] == {"CPU": 0.5} and sweep["args"] == ["r1"]


def test_with_a_local_ray_they_run_in_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.config import load_pipeline_config
    from pipelines.tokenizers import stage as tokenizers_stage

    config = load_pipeline_config(config_file(tmp_path, None))
    monkeypatch.setattr(tokenizers_stage, "run", placement_probe.where)
    monkeypatch.setattr(stage_dag, "_sweep_run", placement_probe.sweep)
    assert stage_dag._run_tokenizers(config)["pid"] == os.getpid()
    assert stage_dag._run_eval(config).sweep.where["pid"] == os.getpid()
