"""Sweep report pieces and ``omni generate``'s input handling, without a model."""

from __future__ import annotations

import io
import json
import runpy
from pathlib import Path

import pytest
from PIL import Image

from evaluation.anytoany import check_task, input_kind
from evaluation.checkpoint import EvalInputError
from evaluation.config import EvalConfig, quick_sampler
from evaluation.report import category_scores, csv_table, markdown_table, plot_sweep
from tests.conftest import REPO

ROWS = [
    {"run_id": "a" * 32, "run_name": "dfm", "step": s, "status": "finished",
     "metrics": {"m": float(s), "n": 1.0}, "headline": ["m"]}
    for s in (2, 4)
] + [
    {"run_id": "b" * 32, "run_name": "ar", "step": 2, "status": "finished",
     "metrics": {"m": 0.5}, "headline": ["m"]},
    {"run_id": "b" * 32, "run_name": "ar", "step": 4, "status": "failed", "metrics": {}},
]  # fmt: skip


def test_plot_has_one_line_per_run_and_is_a_png() -> None:
    png, lines = plot_sweep(ROWS)
    assert lines == {"m": 2}
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size[0] > 100


def test_tables_list_every_checkpoint_with_missing_values_marked() -> None:
    table = markdown_table(ROWS)
    assert table.splitlines()[0] == "| run | step | status | m |"
    assert "| ar | 4 | failed | - |" in table
    assert csv_table(ROWS).splitlines()[0] == "run_id,run_name,step,status,m,n"


def test_category_scores_by_hand() -> None:
    metrics = {
        "understanding/image_caption/bleu": 0.2,
        "understanding/asr/wer": 1.4,  # counts as 1 - 1 = 0
        "generation/text2image/accuracy": 0.5,
        "retrieval/text2image/r1": 0.25,
        "retrieval/image2text/r1": 0.75,
    }
    scores = category_scores(metrics)
    assert scores["score/understanding"] == pytest.approx(0.1)
    assert scores["score/generation"] == 0.5 and scores["score/retrieval"] == 0.5
    assert scores["score/average"] == pytest.approx(1.1 / 3)


def test_input_kinds_and_trained_tasks(tmp_path: Path) -> None:
    assert input_kind("a photo of a cat") == "text"
    (tmp_path / "clip.wav").write_bytes(b"")
    assert input_kind(str(tmp_path / "clip.wav")) == "audio"
    (tmp_path / "notes.xyz").write_bytes(b"")
    with pytest.raises(EvalInputError, match="cannot tell its kind"):
        input_kind(str(tmp_path / "notes.xyz"))
    with pytest.raises(EvalInputError, match="no such file"):
        input_kind(str(tmp_path / "missing.png"))
    check_task("audio", "text")
    with pytest.raises(EvalInputError, match="cannot generate image from audio"):
        check_task("audio", "image")


def test_the_default_suite_is_always_there() -> None:
    config = EvalConfig.model_validate({"suites": {"quick": {"samples": 2}}})
    assert set(config.suites) == {"quick", "default"}
    with pytest.raises(KeyError, match="unknown suite"):
        config.suite("nope")
    with pytest.raises(ValueError, match="unknown tasks"):
        EvalConfig.model_validate({"suites": {"x": {"tasks": ["dance"]}}})


def test_a_setting_keeps_quality_over_checkpoints_only_where_it_keeps_it_on_each() -> None:
    combine = runpy.run_path(str(REPO / "benchmarks" / "sampler_quality.py"))["combine"]

    def row(within: bool, mean: float, speed: float) -> dict:
        return {"metrics": {"m/psnr": {"mean": mean, "within": within}},
                "within_spread": within, "agreement": 0.5, "agreement_greedy": 0.7,
                "tokens_per_s": speed}  # fmt: skip

    tables = {
        "a": {"reference": row(True, 17.0, 100.0), "fast": row(True, 16.9, 400.0)},
        "b": {"reference": row(True, 18.0, 120.0), "fast": row(False, 16.0, 500.0)},
    }
    table = combine(tables)
    assert table["reference"]["within_spread"] and not table["fast"]["within_spread"]
    assert table["fast"]["metrics"]["m/psnr"] == {"mean": 16.45, "within": False}
    assert (table["fast"]["tokens_per_s"], table["reference"]["tokens_per_s"]) == (450.0, 110.0)
    assert table["fast"]["agreement"] == 0.5 and table["fast"]["agreement_greedy"] == 0.7


def test_the_default_sampler_is_the_fastest_quality_preserving_one_measured() -> None:
    """The default suite's sampler (and so ``omni generate``'s) is the setting that
    benchmarks/sampler_quality.py last found fastest within the reference's quality."""
    measured = json.loads((REPO / "benchmarks/results/sampler_quality.json").read_text())
    benchmark = runpy.run_path(str(REPO / "benchmarks" / "sampler_quality.py"))
    overrides = benchmark["SETTINGS"][measured["fastest_preserving"]]
    assert benchmark["sampler_for"](quick_sampler(), overrides, 0.0) == quick_sampler()
    assert EvalConfig().suite("default").sampler == quick_sampler()
