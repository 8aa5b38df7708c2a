"""``omni submit`` without a cluster: the runtime_env, the submission id, attach or resubmit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from infra.config import validate
from pipelines.config import PipelineConfig
from pipelines.workflow import submit as jobs


def config(tmp_path: Path, **sections: Any) -> PipelineConfig:
    data = {
        "workspace": str(tmp_path / "ws"),
        "corpus": {"inputs": [{"uri": str(tmp_path / "docs.jsonl"), "format": "jsonl"}]},
        **sections,
    }
    return validate(PipelineConfig, data)


def test_runtime_env_ships_the_source_tree_and_pinned_requirements(tmp_path: Path) -> None:
    env = jobs.runtime_env(config(tmp_path), "train", "omni-train-x")
    assert env["working_dir"] == str(jobs.PROJECT)
    assert {".venv", ".git", "work", "tests", "examples"} <= set(env["excludes"])
    packages = env["pip"]["packages"]
    assert "torch==2.13.0" in packages  # the local +cpu label is dropped
    assert not any(p.lower().startswith("ray") for p in packages)  # the cluster's Ray stays
    # the lock, transitive requirements included: the cluster resolves nothing itself
    lock = jobs.read_lock()
    pins = dict(p.split("==") for p in packages)
    for transitive in ("aiobotocore", "fsspec", "huggingface-hub", "sqlalchemy"):
        assert pins[transitive] == lock[transitive], transitive
    assert all(pins[name] == lock[name] for name in pins if name in lock)
    assert not {"pytest", "moto", "ruff"} & set(pins)  # dev tools stay home
    shipped = json.loads(env["env_vars"][jobs.CONFIG_ENV])
    assert shipped["workspace"] == str(tmp_path / "ws")
    assert env["env_vars"]["OMNI_SUBMISSION_ID"] == "omni-train-x"
    # Only the stages that read the raw corpus carry examples/.
    assert "examples" not in jobs.runtime_env(config(tmp_path), "shard", "s")["excludes"]


def test_runtime_env_without_pip_or_with_an_image(tmp_path: Path) -> None:
    bare = config(tmp_path, submit={"runtime_env": {"pip": None, "env_vars": {"A": "1"}}})
    env = jobs.runtime_env(bare, "shard", "s")
    assert "pip" not in env and env["env_vars"]["A"] == "1"
    image = config(tmp_path, submit={"runtime_env": {"image_uri": "reg/omni:1"}})
    env = jobs.runtime_env(image, "shard", "s")
    assert env["image_uri"] == "reg/omni:1" and "pip" not in env


def test_the_submission_id_ignores_progress_and_the_submitting_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same work keeps its id while stages finish and from any folder; other data,
    another config or a relative workspace in another folder is other work."""
    (tmp_path / "docs.jsonl").write_text('{"id": "a", "segments": []}\n')
    work = config(tmp_path)
    first = jobs.submission_base(work, "run", jobs.input_fingerprint(work))
    (tmp_path / "ws" / "shards").mkdir(parents=True)  # shard finished meanwhile
    (tmp_path / "ws" / "shards" / "_SUCCESS.json").write_text('{"fingerprint": "f"}')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert jobs.submission_base(work, "run", jobs.input_fingerprint(work)) == first
    packaged = config(tmp_path, submit={"runtime_env": {"pip": None}}, workflow={"retries": 5})
    assert jobs.submission_base(packaged, "run", jobs.input_fingerprint(packaged)) == first
    (tmp_path / "docs.jsonl").write_text('{"id": "b", "segments": []}\n{"id": "c"}\n')
    assert jobs.submission_base(work, "run", jobs.input_fingerprint(work)) != first
    relative = validate(PipelineConfig, {**work.model_dump(mode="json"), "workspace": "ws"})
    here = jobs.submission_base(relative, "run", "x")
    monkeypatch.chdir(tmp_path)
    assert jobs.submission_base(relative, "run", "x") != here


def test_the_submission_id_follows_the_work(tmp_path: Path) -> None:
    base = jobs.submission_base(config(tmp_path), "shard", "abc")
    assert base.startswith("omni-shard-") and base == jobs.submission_base(
        config(tmp_path), "shard", "abc"
    )
    assert base != jobs.submission_base(config(tmp_path), "shard", "def")  # other inputs
    assert base != jobs.submission_base(
        config(tmp_path, shard={"target_tokens": 7}), "shard", "abc"
    )


class FakeClient:
    def __init__(self, jobs_: list[tuple[str, str, int]]) -> None:
        self.jobs = [SimpleNamespace(submission_id=i, status=s, start_time=t) for i, s, t in jobs_]
        self.submitted: list[dict[str, Any]] = []

    def list_jobs(self) -> list[SimpleNamespace]:
        return self.jobs

    def submit_job(self, **kwargs: Any) -> str:
        self.submitted.append(kwargs)
        return kwargs["submission_id"]


@pytest.mark.parametrize("status", ["PENDING", "RUNNING", "SUCCEEDED"])
def test_the_same_work_attaches_to_its_job(tmp_path: Path, status: str) -> None:
    client = FakeClient([("omni-shard-a", "FAILED", 1), ("omni-shard-a-r1", status, 2),
                         ("omni-shard-ab", "FAILED", 3)])  # fmt: skip
    submission = jobs.submit(client, config(tmp_path), "shard", "omni-shard-a")
    assert (submission.submission_id, submission.attached) == ("omni-shard-a-r1", True)
    assert client.submitted == []


def test_a_failed_or_stopped_job_is_followed_by_a_new_attempt(tmp_path: Path) -> None:
    client = FakeClient([("omni-shard-a", "FAILED", 1), ("omni-shard-a-r1", "STOPPED", 2)])
    submission = jobs.submit(client, config(tmp_path), "shard", "omni-shard-a")
    assert (submission.submission_id, submission.attached) == ("omni-shard-a-r2", False)
    [sent] = client.submitted
    assert sent["entrypoint"] == "python -m pipelines.workflow.submit shard"
    assert sent["metadata"]["omni.workspace"] == str(tmp_path / "ws")
    fresh = jobs.submit(FakeClient([]), config(tmp_path), "shard", "omni-shard-b")
    assert (fresh.submission_id, fresh.attached) == ("omni-shard-b", False)


def test_a_remote_ray_address_names_its_jobs_api() -> None:
    assert jobs.jobs_address(None) is None and jobs.jobs_address("auto") is None
    assert jobs.jobs_address("ray://head:10001") == "http://head:8265"
    assert jobs.jobs_address("10.0.0.5:6379") == "http://10.0.0.5:8265"
    assert jobs.jobs_address("http://head:9000") == "http://head:9000"


def test_the_workflow_from_a_stage_is_its_own_job(tmp_path: Path) -> None:
    client = FakeClient([])
    jobs.submit(client, config(tmp_path), "run", "omni-run-from-train-a", start="train")
    [sent] = client.submitted
    assert sent["entrypoint"] == "python -m pipelines.workflow.submit run --from train"
    assert jobs.job_label("run", "train") == "run-from-train" and jobs.job_label("shard") == "shard"
    with pytest.raises(SystemExit, match="usage"):
        jobs.job_main(["run", "--only", "train"])


def test_omni_run_with_a_remote_ray_address_submits_the_workflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.workflow import cli as workflow_cli

    calls: list[tuple] = []
    monkeypatch.setattr(workflow_cli, "_submit", lambda *args, **kw: calls.append((*args, kw)))
    monkeypatch.setattr(workflow_cli, "execute", lambda *args: calls.append(("here", *args)) or 0)
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(config(tmp_path).model_dump(mode="json")))

    def omni_run(*args: str) -> int:
        return CliRunner().invoke(app, ["run", "-c", str(path), *args]).exit_code

    assert omni_run("--set", "ray.address=ray://head:10001", "--from", "train") == 0
    address, pipeline, target, start, options = calls.pop()
    assert (address, target, start, options) == ("http://head:8265", "run", "train", {"wait": True})
    assert pipeline.ray.address == "ray://head:10001"
    assert omni_run("--only", "shard", "--address", "http://h:1") == 0
    address, _, target, start, _ = calls.pop()
    assert (address, target, start) == ("http://h:1", "shard", None)
    assert omni_run("--set", "ray.address=ray://head:10001", "--only", "nope") == 2
    assert omni_run("--set", "ray.address=auto") == 0 and calls.pop()[0] == "here"
    assert calls == []
