"""``omni eval`` / ``omni sweep`` / ``omni generate`` end to end: real ``mlflow server``,
real checkpoints of two ``tiny`` runs (two checkpoints each), concurrent sweep processes."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from evaluation.claims import ClaimStore
from evaluation.report import plot_sweep
from infra.config import validate
from infra.services import MlflowServer
from pipelines import train as train_stage
from pipelines.cli import app
from pipelines.config import PipelineConfig
from pipelines.eval import stage as eval_stage
from pipelines.eval.child_run import evaluate_claimed
from tests.conftest import REPO
from tests.pipelines.eval_crash_hook import POINTS
from tests.pipelines.train_setup import config_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

EXPERIMENT = "eval-sweeps"
QUICK = {"samples": 3, "sampler": {"steps": 4, "temperature": 0.0, "max_length": 64}}
EVAL = {
    "suites": {
        "default": QUICK,
        "concurrent": {**QUICK, "tasks": ["retrieval", "generation"]},
        "flaky": {**QUICK, "samples": 2, "tasks": ["speed"]},
        **{f"crash-{point}": {**QUICK, "samples": 2, "tasks": ["speed"]} for point in POINTS},
    },
    "sweep": {"max_attempts": 2, "lease_s": 60},
}
TRAIN = {"max_steps": 4, "checkpoint_every": 2, "num_workers": 1, "keep_last": 2}
runner = CliRunner()


@dataclass
class Trained:
    config: PipelineConfig
    config_path: Path
    run_ids: list[str]
    client: MlflowClient


@pytest.fixture(scope="module")
def trained(tokens_workspace: Path, mlflow_server: MlflowServer, tmp_path_factory) -> Trained:
    """Two finished tiny runs (seeds 0 and 1), each with complete checkpoints at steps 2, 4."""
    mlflow = {"tracking_uri": mlflow_server.tracking_uri, "experiment": EXPERIMENT}
    run_ids = []
    for seed in (0, 1):
        config = config_for(tokens_workspace, mlflow=mlflow, eval=EVAL,
                            train={**TRAIN, "seed": seed})  # fmt: skip
        run_ids.append(train_stage.run(config).run_id)
    path = tmp_path_factory.mktemp("eval-config") / "config.json"
    path.write_text(config.model_dump_json())
    return Trained(config, path, run_ids, MlflowClient(mlflow_server.tracking_uri))


def children(trained: Trained, suite: str) -> list:
    experiment = trained.client.get_experiment_by_name(EXPERIMENT).experiment_id
    query = f"tags.`eval.suite` = '{suite}' and tags.`omni.stage` = 'eval'"
    return trained.client.search_runs([experiment], query, max_results=1000)


def test_a_sweep_evaluates_every_checkpoint_once_in_step_order(trained: Trained) -> None:
    report = eval_stage.sweep(trained.config, EXPERIMENT)
    assert (report.evaluated, report.failed) == (4, 0)
    runs = children(trained, "default")
    assert len(runs) == 4
    by_start = sorted(runs, key=lambda r: r.info.start_time)
    assert [int(r.data.tags["eval.checkpoint_step"]) for r in by_start] == [2, 2, 4, 4]
    for run in runs:
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] in trained.run_ids
        assert tags["eval.status"] == "FINISHED" and run.info.status == "FINISHED"
        assert "score/average" in run.data.metrics
    for run_id in trained.run_ids:  # mirrored into the training run at the checkpoint steps
        history = trained.client.get_metric_history(run_id, "eval/score/average")
        assert sorted(m.step for m in history) == [2, 4]
    assert Image.open(report.plot_path).format == "PNG"
    Image.open(report.plot_path).verify()
    _, lines = plot_sweep(report.rows)
    assert set(lines.values()) == {2}  # one line per run in every panel
    assert "score/average" in report.table_markdown and report.report_run_id

    again = eval_stage.sweep(trained.config, EXPERIMENT)
    assert (again.evaluated, again.failed) == (0, 0) and len(children(trained, "default")) == 4
    assert again.report_run_id is None and again.plot_path == report.plot_path


def test_compare_tables_each_metric_with_a_chance_level_over_the_seeds(
    trained: Trained,
) -> None:
    eval_stage.sweep(trained.config, EXPERIMENT)  # the default suite's (done once, above)
    report = eval_stage.compare(trained.config, trained.run_ids, ["default"])
    [row] = report.rows  # the runs differ in their seed alone: one variant
    assert (row["variant"], row["runs"]) == ("all runs", 2)
    last = [
        next(c.data.metrics for c in children(trained, "default")
             if c.data.tags["mlflow.parentRunId"] == run_id
             and c.data.tags["eval.checkpoint_step"] == "4")
        for run_id in trained.run_ids
    ]  # fmt: skip
    assert row["metrics"] and all(name.startswith("retrieval/") for name in row["metrics"])
    for name, (mean, spread, chance) in row["metrics"].items():
        values = [metrics[name] for metrics in last]
        assert mean == pytest.approx(np.mean(values))
        assert spread == pytest.approx(np.std(values, ddof=1))
        assert chance == last[0][name.removesuffix("/r1") + "/chance_r1"]
        assert f"| {name} | {chance:.3f} | {mean:.3f} ± {spread:.3f} |" in report.table_markdown
    saved = {a.path for a in trained.client.list_artifacts(report.run_id)}
    assert saved == {"compare.md", "compare.json"}


def test_two_concurrent_sweeps_evaluate_each_checkpoint_once(trained: Trained) -> None:
    command = [sys.executable, "-m", "pipelines.cli", "sweep", "--config",
               str(trained.config_path), "--experiment", EXPERIMENT, "--once",
               "--suite", "concurrent"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sweeps = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=400)[0] for p in sweeps]
    assert [p.returncode for p in sweeps] == [0, 0], outputs
    runs = children(trained, "concurrent")
    keys = sorted((r.data.tags["mlflow.parentRunId"], r.data.tags["eval.checkpoint_step"])
                  for r in runs)  # fmt: skip
    assert len(keys) == 4 and len(set(keys)) == 4, keys


def test_a_failing_evaluation_is_retried_then_marked_failed(
    trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(context: object) -> None:
        raise RuntimeError("injected failure")

    monkeypatch.setattr("evaluation.tasks.speed.run", broken)
    report = eval_stage.sweep(trained.config, run_ids=trained.run_ids[:1], suite="flaky")
    assert (report.evaluated, report.failed) == (0, 2)
    assert all(row["status"] == "failed" for row in report.rows)
    assert all(row["errors"] == ["injected failure"] * 2 for row in report.rows)
    assert any("failed after 2 attempts: injected failure" in note for note in report.notes)
    runs = children(trained, "flaky")
    assert len(runs) == 4  # two attempts per checkpoint, each a FAILED child run with its error
    assert {(r.info.status, r.data.tags["eval.status"]) for r in runs} == {("FAILED", "FAILED")}
    assert {r.data.tags["error"] for r in runs} == {"injected failure"}
    assert eval_stage.sweep(trained.config, run_ids=trained.run_ids[:1], suite="flaky").failed == 0


def one_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


def test_omni_eval_and_sweeps_evaluate_each_checkpoint_once_between_them(
    trained: Trained,
) -> None:
    """``omni eval`` leaves the sweeps' done record; a slow attempt whose lease lapsed and
    was taken over ends SUPERSEDED and mirrors nothing."""
    run_id = trained.run_ids[1]
    args = ["eval", "--config", str(trained.config_path), "--run", run_id,
            "--checkpoint", "2", "--suite", "flaky"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "speed/tokens_per_s" in result.output and "child run" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "already evaluated" in again.output, again.output

    session = eval_stage.Session(trained.config)
    slow = ClaimStore(session.storage, session.workspace, "flaky", lease_s=0.05, max_attempts=2)
    stale = slow.claim(run_id, 4)
    time.sleep(0.1)  # its lease lapses while its owner lives on
    report = eval_stage.sweep(trained.config, run_ids=[run_id], suite="flaky")
    assert (report.evaluated, report.already_done) == (1, 1)  # step 2 was omni eval's
    assert not evaluate_claimed(session, slow, stale, "flaky").published
    mine = [r for r in children(trained, "flaky") if r.data.tags["mlflow.parentRunId"] == run_id]
    assert sorted((r.data.tags["eval.checkpoint_step"], r.data.tags["eval.status"], r.info.status)
                  for r in mine) == [("2", "FINISHED", "FINISHED"), ("4", "FINISHED", "FINISHED"),
                                     ("4", "SUPERSEDED", "KILLED")]  # fmt: skip
    history = trained.client.get_metric_history(run_id, "eval/flaky/speed/tokens_per_s")
    assert sorted(m.step for m in history) == [2, 4]


@pytest.mark.parametrize("point", list(POINTS))
def test_a_sweep_killed_at_any_point_leaves_one_finished_child_and_one_mirrored_value(
    trained: Trained, tmp_path: Path, point: str
) -> None:
    """SIGKILL the evaluating process after each step of evaluating and publishing a
    checkpoint; once its lease lapsed, the next sweep leaves one FINISHED child run per
    checkpoint, one mirrored point per headline metric and step, and a done record naming
    that child; the dead attempt's child is completed if its result was published, else
    ended KILLED with the reason. A third sweep finds nothing to do."""
    suite, run_id = f"crash-{point}", trained.run_ids[0]
    data = json.loads(trained.config.model_dump_json())
    data["eval"]["sweep"]["lease_s"] = 2.0
    config, path = validate(PipelineConfig, data), tmp_path / "config.json"
    path.write_text(json.dumps(data))
    command = [sys.executable, "-m", "tests.pipelines.eval_crash_hook", point, str(path), run_id,
               suite]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    died = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert died.returncode == -signal.SIGKILL, died.stdout[-2000:] + died.stderr[-3000:]
    session = eval_stage.Session(config)
    store = session.claims(suite)
    assert store.done(run_id, 2) is None  # the kill came before the done record
    time.sleep(2.5)  # the dead sweep's lease lapses

    report = eval_stage.sweep(config, run_ids=[run_id], suite=suite)
    assert report.failed == 0 and report.repaired == (point != "evaluated"), report.notes
    runs = children(trained, suite)
    ended = [r for r in runs if r.info.status == r.data.tags["eval.status"] == "FINISHED"]
    finished = {int(r.data.tags["eval.checkpoint_step"]): r for r in ended}
    assert sorted(finished) == [2, 4] and len(ended) == 2
    assert all("eval.killed_reason" not in r.data.tags for r in finished.values())
    others = [r for r in runs if r.info.run_id not in {f.info.run_id for f in finished.values()}]
    if point == "evaluated":  # the dead attempt's child: ended, with why
        [dead] = others
        assert (dead.info.status, dead.data.tags["eval.status"]) == ("KILLED", "KILLED")
        assert dead.data.tags["eval.attempt"] == "1"
        assert "stopped renewing its lease" in dead.data.tags["eval.killed_reason"]
    else:
        assert others == []
    done = store.done_steps(run_id)
    assert {step: record["child_run_id"] for step, record in done.items()} == {
        step: run.info.run_id for step, run in finished.items()
    }
    for metric in done[2]["headline"]:
        history = trained.client.get_metric_history(run_id, f"eval/{suite}/{metric}")
        assert sorted(m.step for m in history) == [2, 4], metric

    again = eval_stage.sweep(config, run_ids=[run_id], suite=suite)
    assert (again.evaluated, again.repaired, again.already_done) == (0, 0, 2)
    assert len(children(trained, suite)) == len(runs)


def test_omni_generate_from_the_command_line(trained: Trained, tmp_path: Path) -> None:
    config, run_id = str(trained.config_path), trained.run_ids[0]
    base = ["generate", "--config", config, "--run", run_id]
    image = REPO / "examples" / "corpus" / "media" / "images" / "astronaut.jpg"
    cases = {"text": ["--input", str(image), "--to", "text"],
             "png": ["--input", "a red brick wall", "--to", "image"],
             "wav": ["--input", "a dog barks twice", "--to", "audio"]}  # fmt: skip
    for suffix, args in cases.items():
        out = tmp_path / f"out.{suffix}"
        result = runner.invoke(app, [*base, *args, "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out.png").size[0] > 0
    samples, rate = soundfile.read(tmp_path / "out.wav")
    assert rate == 16000 and len(samples) > 0 and np.isfinite(samples).all()
    assert (tmp_path / "out.text").read_text(encoding="utf-8").endswith("\n")

    not_an_image = tmp_path / "fake.png"
    not_an_image.write_bytes(b"not an image")
    bad = {
        "unknown run id": ["eval", "--config", config, "--run", "0" * 32],
        "no complete checkpoint at step 3": ["eval", "--config", config, "--run", run_id,
                                             "--checkpoint", "3"],
        "not a readable image": [*base, "--input", str(not_an_image), "--to", "text",
                                 "--out", str(tmp_path / "x.txt")],
        "cannot generate image from image": [*base, "--input", str(image), "--to",
                                                     "image", "--out", str(tmp_path / "x.png")],
    }  # fmt: skip
    for message, args in bad.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in one_line(result.output), result.output


def test_sampler_quality_compares_settings_on_a_trained_checkpoint(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/sampler_quality.py on two real checkpoints: every setting gets the tasks'
    metrics on each, its agreement with the one-token-per-step reference and its speed; the
    reference agrees with itself under the same seed and is within its own spread; a setting
    keeps quality over both only where it keeps it on each."""
    out = tmp_path / "quality.json"
    argv = ["sampler_quality.py", "--config", str(trained.config_path),
            "--run", *trained.run_ids, "--samples", "2", "--seeds", "0", "1",
            "--settings", "reference", "block32_k16", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "benchmarks" / "sampler_quality.py"), run_name="__main__")
    result = json.loads(out.read_text())
    assert set(result["checkpoints"]) == set(trained.run_ids)
    wanted = {"understanding/image_caption/bleu", "understanding/asr/wer",
              "generation/text2image/psnr", "generation/text2audio/mel_l1"}  # fmt: skip
    outputs = {"image_caption", "video_caption", "asr", "text2image", "text2audio"}
    for checkpoint in result["checkpoints"].values():
        reference, fast = checkpoint["table"]["reference"], checkpoint["table"]["block32_k16"]
        assert reference["agreement"] == reference["agreement_greedy"] == 1.0
        assert reference["within_spread"]
        assert wanted <= set(reference["metrics"])
        assert set(checkpoint["compared_outputs"]) == outputs
        assert all(count > 0 for count in checkpoint["compared_outputs"].values())
        assert set(fast["metrics"]) == set(reference["metrics"])
        assert 0.0 <= fast["agreement"] <= 1.0 and 0.0 <= fast["agreement_greedy"] <= 1.0
        assert fast["tokens_per_s"] > reference["tokens_per_s"]  # 16 tokens a step against 1
    fast = result["table"]["block32_k16"]
    each = [c["table"]["block32_k16"]["within_spread"] for c in result["checkpoints"].values()]
    assert fast["within_spread"] == all(each)
    assert result["table"]["reference"]["within_spread"]
    assert result["fastest_preserving"] in ("reference", "block32_k16")
    assert result["ratio"] == pytest.approx(result["value"] / result["baseline"], abs=1e-3)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_cache_fidelity_compares_refresh_periods_with_exact_decoding(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/cache_fidelity.py on a real checkpoint: exact decoding agrees with itself,
    every cache setting gets its agreement, speed and share of the work recomputed, and the
    headline is the default's content agreement at the longest canvas."""
    out = tmp_path / "fidelity.json"
    argv = ["cache_fidelity.py", "--config", str(trained.config_path), "--run",
            trained.run_ids[0], "--lengths", "32", "96", "--refresh", "4", "--batch", "2",
            "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    benchmark = runpy.run_path(str(REPO / "benchmarks" / "cache_fidelity.py"), run_name="__main__")
    result = json.loads(out.read_text())
    assert set(result["tables"]) == {"real", "random"}
    for table in result["tables"].values():
        assert set(table) == {"length32", "length96"}
        for row in table.values():
            assert set(row) == {"exact", "refresh4", "refresh8", "never"}
            assert row["exact"]["agreement"] == row["exact"]["content_agreement"] == 1.0
            assert row["exact"]["recomputed_fraction"] == 1.0
            for name in ("refresh4", "refresh8", "never"):
                assert 0.0 <= row[name]["agreement"] <= 1.0
                assert 0.0 < row[name]["recomputed_fraction"] < 1.0
            # never refreshing recomputes no more than refreshing every 4 steps
            assert row["never"]["recomputed_fraction"] <= row["refresh4"]["recomputed_fraction"]
        for key, row in table.items():  # at least one token a step, one canvas pass each
            length = int(key.removeprefix("length"))
            assert all(0 < setting["steps"] <= length for setting in row.values())
    for source in ("real", "random"):  # the AR yardstick at every length
        assert set(result["ar_tokens_per_s"][source]) == {"length32", "length96"}
        assert all(rate > 0 for rate in result["ar_tokens_per_s"][source].values())
    random96 = result["tables"]["random"]["length96"]
    assert result["default"] == "refresh8"
    assert result["value"] == random96["refresh8"]["content_agreement"]
    assert result["baseline"] == random96["never"]["content_agreement"]
    # Content agreement leaves out where exact decoding wrote <PAD> (9 here); the headline
    # reads it, not the agreement over every position.
    exact, ids = torch.tensor([[5, 6, 9, 9]]), torch.tensor([[5, 7, 9, 9]])
    assert benchmark["agreements"](ids, exact, pad=9) == {
        "agreement": 0.75,
        "content_agreement": 0.5,
        "content_fraction": 0.5,
    }
    rows = {"refresh8": {"agreement": 0.9, "content_agreement": 0.6},
            "never": {"agreement": 0.8, "content_agreement": 0.3}}  # fmt: skip
    tables = {"random": {"length32": rows, "length96": rows}}
    top = benchmark["headline"](tables, "refresh8", [32, 96])
    assert (top["value"], top["baseline"], top["ratio"], top["target"]) == (0.6, 0.3, 2.0, 0.6)
