"""Kill ``omni shard`` mid-run, run it again: no document lost, none twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.shard import stage as shard
from tests import builders
from tests.conftest import pipeline_config

pytestmark = pytest.mark.integration


def replicated_corpus(sample_corpus: Path, out: Path, copies: int) -> Path:
    """``copies`` renamed copies of every sample document, media shared with the sample."""
    docs = builders.read_docs(sample_corpus)
    replicated = [{**doc, "id": f"{doc['id']}~{copy}"} for copy in range(copies) for doc in docs]
    builders.write_jsonl(out, replicated)
    return out


def document_ids(stage_dir: Path) -> list[str]:
    ids: list[str] = []
    for part in sorted(stage_dir.glob("part-*.parquet")):
        ids += pq.read_table(part, columns=["id"])["id"].to_pylist()
    return ids


def write_config(path: Path, workspace: Path, docs: Path, media_root: Path) -> None:
    path.write_text(json.dumps({  # JSON is YAML
        "workspace": str(workspace),
        "corpus": {"inputs": [{"uri": str(docs), "format": "jsonl", "name": "corpus",
                               "media_root": str(media_root)}]},
        "ray": {"num_cpus": 1, "object_store_memory_mb": 256},
        "shard": {"target_tokens": 5_000, "jsonl_split_bytes": 2048},
    }))  # fmt: skip


def test_killed_run_resumes_without_losing_or_duplicating(
    ray_cluster: None, sample_corpus: Path, tmp_path: Path
) -> None:
    docs = replicated_corpus(sample_corpus, tmp_path / "docs.jsonl", copies=4)
    config_path = tmp_path / "config.yaml"
    workspace = tmp_path / "killed"
    write_config(config_path, workspace, docs, sample_corpus)
    markers = workspace / "shards" / "_stats"

    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "shard", "--config", str(config_path)],
        start_new_session=True,  # its own process group: the kill takes Ray's processes too
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while len(list(markers.glob("*.json"))) < 3:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no work unit finished in time"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    finished_before_kill = len(list(markers.glob("*.json")))
    plan = json.loads((workspace / "shards" / "_RUNNING.json").read_text())["plan"]
    assert finished_before_kill < len(plan), "killed mid-run, not after the last shard"
    assert not (workspace / "shards" / "_SUCCESS.json").exists()

    from pipelines.config import load_pipeline_config

    resumed = shard.run(load_pipeline_config(config_path))
    assert resumed.resumed_units >= finished_before_kill >= 3  # the saved plan was reused

    uninterrupted = pipeline_config(
        tmp_path / "clean",
        [{"uri": str(docs), "format": "jsonl", "name": "corpus", "media_root": str(sample_corpus)}],
        shard={"target_tokens": 5_000, "jsonl_split_bytes": 2048},
    )
    reference = shard.run(uninterrupted)
    killed_ids = document_ids(workspace / "shards")
    clean_ids = document_ids(tmp_path / "clean" / "shards")
    assert len(killed_ids) == len(set(killed_ids)) == 4 * 374  # none twice, none missing
    assert killed_ids == clean_ids  # and in the very same shards and order
    assert resumed.shards == reference.shards
