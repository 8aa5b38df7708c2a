"""Shared pytest fixtures.

Service fixtures are session-scoped: each server starts once (MLflow takes 8-17 s) and
is shared by every test that asks for it, so tests must use unique bucket and
experiment names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.config import validate
from infra.services import DUMMY_AWS_CREDENTIALS, DUMMY_AWS_REGION, MlflowServer, MotoServer
from pipelines.config import PipelineConfig


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A running moto S3 server on 127.0.0.1; changes no environment variables."""
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running MLflow tracking server on 127.0.0.1 with its own store and artifacts."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture
def s3_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """Dummy AWS credentials in the environment for this test; returns the S3 endpoint URL."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_AWS_CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_AWS_CREDENTIALS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", DUMMY_AWS_REGION)
    # A developer's real profile or session token must not mix with the dummy keys.
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return moto_server.endpoint_url


REPO = Path(__file__).resolve().parents[1]
SAMPLE_CORPUS = REPO / "examples" / "corpus"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray instance for the whole session (start-up costs ~5 s).

    Workers inherit the environment of ``ray.init``, so the dummy AWS credentials the
    S3 tests use are put in place first; stages reuse this connection.
    """
    import ray

    for name, value in DUMMY_AWS_CREDENTIALS.items():
        os.environ.setdefault(name.upper(), value)
    os.environ.setdefault("AWS_DEFAULT_REGION", DUMMY_AWS_REGION)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=256 * 2**20,
        include_dashboard=False,
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


@pytest.fixture
def sample_corpus() -> Path:
    return SAMPLE_CORPUS


def pipeline_config(workspace: Path | str, inputs: list[dict], **overrides: Any) -> PipelineConfig:
    """A validated config for tests: given inputs, small shards, fine-grained splits."""
    data: dict[str, Any] = {
        "workspace": str(workspace),
        "corpus": {"inputs": inputs},
        "shard": {"target_tokens": 4000, "jsonl_split_bytes": 2048, "parquet_split_rows": 16},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return validate(PipelineConfig, data)


def upload_folder(moto_server: MotoServer, bucket: str, prefix: str, folder: Path) -> None:
    """Create ``bucket`` and copy every file under ``folder`` to ``s3://bucket/prefix/...``."""
    moto_server.create_bucket(bucket)
    client = moto_server.s3_client()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder)}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def run_stage_in_own_ray(stage: str, config_path: Path, init_kwargs: str = "") -> dict[str, Any]:
    """``pipelines.<stage>.stage.run`` in a fresh process on its own local Ray (2 CPUs), started
    with the extra ``ray.init`` keyword arguments ``init_kwargs`` (Python source, e.g.
    ``"num_gpus=1"``); returns the stage's report as a dict."""
    script = (
        "import dataclasses, json, ray;"
        f"ray.init(address='local', num_cpus=2, include_dashboard=False, {init_kwargs});"
        f"from pipelines.config import load_pipeline_config; from pipelines.{stage} import stage;"
        f"r = stage.run(load_pipeline_config({str(config_path)!r}));"
        "print('REPORT', json.dumps(dataclasses.asdict(r)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [report] = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    return json.loads(report.removeprefix("REPORT "))
