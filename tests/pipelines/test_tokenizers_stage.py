"""``omni tokenizers train | eval`` on the sample corpus, tracked in a local MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from infra.tracking import local_store
from pipelines import shard, tokenizers_stage
from pipelines.cli import app
from tests.conftest import pipeline_config
from tokenization.bundle import Tokenizers
from tokenization.vocab import VocabLayout

pytestmark = pytest.mark.integration

WARMUP = {
    "text": {"vocab_size": 512},
    "warmup": {
        "image_steps": 80,
        "image_batch": 8,
        "audio_steps": 40,
        "audio_batch": 4,
        "eval_fraction": 0.25,
        "log_every": 10,
    },
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> tuple:
    workspace = tmp_path_factory.mktemp("tokenizers-ws")
    corpus = Path(__file__).resolve().parents[2] / "examples" / "corpus"
    config = pipeline_config(
        workspace,
        [{"uri": str(corpus / "docs.jsonl"), "format": "jsonl"}],
        tokenizers=WARMUP,
        mlflow={"experiment": "tokenizers-test"},
    )
    shard.run(config)
    return config, tokenizers_stage.run(config), workspace


def test_warmup_improves_held_out_reconstruction(trained: tuple) -> None:
    _, report, _ = trained
    assert report.images[0] > 40 and report.images[1] > 5  # images + video frames, split
    assert report.audio[0] >= 6 and report.audio[1] >= 1
    assert report.steps == {"image": 80, "audio": 40}
    # Margins well inside what 80 / 40 steps give on this corpus (measured: see the note).
    assert report.after["image_psnr"] > report.before["image_psnr"] + 2.0, report
    assert report.after["audio_mel_l1"] < 0.8 * report.before["audio_mel_l1"], report
    assert report.after["image_usage"] > 0.05 and report.after["audio_usage"] > 0.02, report


def test_saved_tokenizers_reload_with_their_layout(trained: tuple) -> None:
    _, report, workspace = trained
    folder = workspace / "tokenizers"
    assert json.loads((folder / "_SUCCESS.json").read_text())["vocab_size"] == report.vocab_size
    tokenizers = Tokenizers.load(folder)
    layout = VocabLayout.load(folder)
    assert layout == tokenizers.layout and layout.size == report.vocab_size
    image = Path(__file__).resolve().parents[2] / "examples/corpus/media/images/coffee.jpg"
    ids = tokenizers.image.encode(tokenizers.image.preprocess(image.read_bytes())[None])
    assert ids.shape == (1, tokenizers.image.tokens_per_image)
    unified = layout.to_unified("image", ids)
    assert (layout.modality_of(unified.numpy()) == 2).all()
    again = Tokenizers.load(folder).image.encode(
        tokenizers.image.preprocess(image.read_bytes())[None]
    )
    assert torch.equal(ids, again)


def test_mlflow_run_has_params_metrics_and_grids(trained: tuple) -> None:
    config, report, workspace = trained
    uri, _ = local_store(str(workspace))
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(report.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["tokenizers.warmup.image_steps"] == "80"
    assert run.data.metrics["after/image_psnr"] == pytest.approx(report.after["image_psnr"])
    losses = client.get_metric_history(report.run_id, "image/rec")
    assert len(losses) >= 8 and losses[-1].value < losses[0].value
    assert [a.path for a in client.list_artifacts(report.run_id, "images")] == [
        "images/after.png",
        "images/before.png",
    ]


def test_rerun_is_skipped(trained: tuple) -> None:
    config, report, _ = trained
    again = tokenizers_stage.run(config)
    assert again.skipped and again.after == report.after and again.run_id == report.run_id


def test_eval_reports_quality_on_a_media_folder(trained: tuple, tmp_path: Path) -> None:
    config, _, _ = trained
    media = Path(__file__).resolve().parents[2] / "examples" / "corpus" / "media"
    result = tokenizers_stage.evaluate_media(config, media)
    assert result["items"] == {"audio": 12, "image": 27, "video": 4}
    assert result["image_psnr"] > 10 and result["audio_mel_l1"] > 0
    assert result["video_tokens_per_item"] == 8 * 64
    config_path = tmp_path / "config.json"
    config_path.write_text(config.model_dump_json())
    cli = CliRunner().invoke(
        app,
        ["tokenizers", "eval", "-c", str(config_path), "--media", str(media / "images"), "--json"],
    )
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output)["items"] == {"image": 27}


def test_train_without_shards_fails_naming_the_step(tmp_path: Path) -> None:
    config = pipeline_config(tmp_path, [{"uri": "x.jsonl", "format": "jsonl"}])
    with pytest.raises(FileNotFoundError, match="run `omni shard` first"):
        tokenizers_stage.run(config)
