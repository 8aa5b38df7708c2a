"""``omni pretokenize`` on a real Ray actor pool: buckets, codec, exactly-once, bad media."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from infra.services import MlflowServer, MotoServer
from pipelines.pretokenize import stage as pretokenize
from pipelines.shard import stage as shard
from pipelines.tokenizers import stage as tokenizers_stage
from tests import builders
from tests.conftest import pipeline_config, run_stage_in_own_ray, upload_folder
from tests.pipelines.crash_hook import POISON
from tests.pipelines.train_setup import QUICK_TOKENIZERS, use_tokenizers
from tokenization.token_samples import read_token_samples
from tokenization.vocab import VocabLayout

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "corpus"
# 2 of the 17 "interleaved-" documents hold one audio clip and texts: audio2text/text2audio
EXPECTED = {
    "image2text": 40,
    "text2image": 40,
    "audio2text": 14,
    "text2audio": 14,
    "video2text": 5,
    "text2video": 5,
    "interleaved": 15,
    "text": 300,
}


def prepared(workspace: Path, docs: Path, tokenizers_from: Path | None = None, **overrides: dict):
    """A config whose shards and tokenizers are built; pretokenize is left to the test.
    ``tokenizers_from``: a workspace whose tokenizers are copied instead of warming up new
    ones (the session's ``tokens_workspace``: the same settings and corpus)."""
    config = pipeline_config(
        workspace,
        [{"uri": str(docs), "format": "jsonl", "name": "corpus", "media_root": str(CORPUS)}],
        tokenizers=QUICK_TOKENIZERS,
        **overrides,
    )
    shard.run(config)
    if tokenizers_from is None:
        tokenizers_stage.run(config)
    else:
        use_tokenizers(tokenizers_from, workspace)
    return config


def all_keys(tokens_dir: Path) -> list[str]:
    keys = []
    for tar in sorted(tokens_dir.glob("*/*.tar")):
        keys += [s["__key__"] for s in wds.WebDataset([str(tar)], shardshuffle=False)]
    return keys


def samples_by_document(tokens_dir: Path) -> list[tuple[str, str]]:
    """(native document id, bucket) of every sample in the tars, sorted."""
    found = []
    for tar in sorted(tokens_dir.glob("*/*.tar")):
        for sample in wds.WebDataset([str(tar)], shardshuffle=False):
            meta = json.loads(sample["meta.json"])
            found.append((meta["native_id"], meta["bucket"]))
    return sorted(found)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory, tokens_workspace: Path) -> tuple:
    workspace = tmp_path_factory.mktemp("pretokenize")
    config = prepared(workspace, CORPUS / "docs.jsonl", tokens_workspace)
    return config, pretokenize.run(config), workspace / "tokens"


def test_every_bucket_gets_its_documents(sample_run: tuple) -> None:
    _, report, tokens = sample_run
    assert {b: c["samples"] for b, c in report.buckets.items()} == EXPECTED
    assert report.documents == 374 and report.quarantined == {}
    assert report.devices == ["cpu"] and report.gpu_ids == []
    stats = json.loads((tokens / "stats.json").read_text())
    assert {b: s["samples"] for b, s in stats.items()} == EXPECTED
    assert all(sum(s["histogram"].values()) == s["samples"] for s in stats.values())


def test_tars_are_plain_webdataset_sorted_and_match_the_manifest(sample_run: tuple) -> None:
    _, report, tokens = sample_run
    manifest = pq.read_table(tokens / "manifest.parquet").to_pylist()
    assert len(manifest) == report.tars
    import hashlib

    total = Counter()
    for entry in manifest:
        path = tokens / entry["path"]
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            names = archive.getnames()
        assert names == sorted(names)
        samples = list(wds.WebDataset([str(path)], shardshuffle=False))  # no project code
        assert len(samples) == entry["samples"]
        for sample in samples:
            assert set(sample) >= {"__key__", "tokens.npy", "modality.npy", "meta.json"}
            tokens_array = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
            assert tokens_array.dtype == np.int32
            meta = json.loads(sample["meta.json"])
            assert meta["bucket"] == entry["bucket"] and meta["split"] in ("train", "eval")
        total[entry["bucket"]] += entry["samples"]
    assert dict(total) == EXPECTED


def test_token_samples_read_back_as_tensors_in_the_saved_layout(sample_run: tuple) -> None:
    _, _, tokens = sample_run
    layout = VocabLayout.load(tokens.parent / "tokenizers")
    urls = sorted(str(p) for p in (tokens / "image2text").glob("*.tar"))
    samples = list(read_token_samples(urls))
    assert len(samples) == 40
    for sample in samples:
        assert sample.tokens[0] == layout.special_id("<BOS>")
        assert sample.tokens[-1] == layout.special_id("<EOS>")
        codes = layout.modality_of(sample.tokens.numpy())
        assert np.array_equal(codes, sample.modality.numpy())
        assert sample.meta["layout"] == layout.fingerprint()
        response = sample.tokens[sample.meta["instruction_length"] :]
        assert (layout.modality_of(response.numpy()) != 2).all()  # image2text: text answers


def test_rerun_is_skipped(sample_run: tuple) -> None:
    config, report, _ = sample_run
    again = pretokenize.run(config)
    assert again.skipped and again.buckets == report.buckets


def test_media_the_tokenizers_refuse_are_quarantined(
    tokens_workspace: Path, tmp_path: Path
) -> None:
    from PIL import Image

    media = tmp_path / "media"
    media.mkdir()
    Image.new("RGB", (4, 4), "red").save(media / "tiny.png")  # decodes, but < min_side
    (media / "silent.wav").write_bytes(builders.silent_wav(1.0))  # decodes, but silent
    docs = tmp_path / "docs.jsonl"
    builders.write_jsonl(
        docs,
        [
            {
                "id": "tiny",
                "segments": [
                    {"type": "image", "path": "media/tiny.png"},
                    {"type": "text", "text": "a red dot"},
                ],
            },
            {
                "id": "silent",
                "segments": [
                    {"type": "audio", "path": "media/silent.wav"},
                    {"type": "text", "text": "nothing"},
                ],
            },
            {"id": "fine", "segments": [{"type": "text", "text": "just text"}]},
        ],
    )
    config = pipeline_config(
        tmp_path / "ws", [{"uri": str(docs), "format": "jsonl"}], tokenizers=QUICK_TOKENIZERS
    )
    shard.run(config)
    use_tokenizers(tokens_workspace, tmp_path / "ws")
    report = pretokenize.run(config)
    assert report.quarantined == {"audio_rejected": 1, "image_rejected": 1}
    rows = pq.read_table(tmp_path / "ws" / "tokens" / "quarantine.parquet").to_pylist()
    assert {r["native_id"]: r["reason"] for r in rows} == {
        "tiny": "image_rejected",
        "silent": "audio_rejected",
    }
    assert all(r["stage"] == "pretokenize" and r["detail"] for r in rows)
    assert {b: c["samples"] for b, c in report.buckets.items()} == {"text": 1}  # "just text"


def replicated(tmp_path: Path, copies: int) -> Path:
    docs = builders.read_docs(CORPUS)
    out = tmp_path / "docs.jsonl"
    builders.write_jsonl(out, [{**d, "id": f"{d['id']}~{c}"} for c in range(copies) for d in docs])
    return out


def test_a_killed_actor_is_restarted_and_nothing_is_lost_or_doubled(
    sample_run: tuple, tokens_workspace: Path, tmp_path: Path
) -> None:
    docs = replicated(tmp_path, 2)
    killed = prepared(tmp_path / "killed", docs, tokens_workspace, shard={"target_tokens": 3000})
    markers = tmp_path / "killed" / "tokens" / "_done"
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(report=pretokenize.run(killed)))
    worker.start()
    deadline = time.monotonic() + 120
    while not (markers.exists() and list(markers.glob("*.json"))):
        assert time.monotonic() < deadline and worker.is_alive()
        time.sleep(0.05)
    # This session's Ray runs under this process: never an actor of another test run's.
    ours = {child.pid for child in psutil.Process().children(recursive=True)}
    victims = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid in ours and any("PretokenizeActor" in part for part in (p.info["cmdline"] or []))
    ]
    assert victims, "no actor process found"
    os.kill(victims[0].pid, signal.SIGKILL)
    worker.join(timeout=300)
    assert "report" in outcome, "the stage did not finish after the actor was killed"
    keys = all_keys(tmp_path / "killed" / "tokens")
    assert len(keys) == len(set(keys)) == 2 * sum(EXPECTED.values())
    # Every sample of the module's uninterrupted run, once per copy of its document.
    once = samples_by_document(sample_run[2])
    copies = sorted((f"{doc}~{c}", bucket) for doc, bucket in once for c in (0, 1))
    assert samples_by_document(tmp_path / "killed" / "tokens") == copies


def test_a_killed_job_resumes_without_losing_or_doubling(
    tokens_workspace: Path, tmp_path: Path
) -> None:
    docs = replicated(tmp_path, 2)
    config = prepared(
        tmp_path / "ws", docs, tokens_workspace, shard={"target_tokens": 3000}, ray={"num_cpus": 1}
    )
    config_path = tmp_path / "config.json"
    config_path.write_text(config.model_dump_json())
    markers = tmp_path / "ws" / "tokens" / "_done"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "pretokenize", "--config", str(config_path)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not (markers.exists() and len(list(markers.glob("*.json"))) >= 2):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert not (tmp_path / "ws" / "tokens" / "_SUCCESS.json").exists()
    report = pretokenize.run(config)
    assert report.resumed_shards >= 2
    keys = all_keys(tmp_path / "ws" / "tokens")
    assert len(keys) == len(set(keys)) == 2 * sum(EXPECTED.values())


def test_a_medium_that_crashes_its_decoder_is_quarantined_alone(
    tokens_workspace: Path, tmp_path: Path
) -> None:
    """An image whose decoding aborts the process (like a native segfault) on every try:
    the shard still finishes, that document alone is quarantined, every other sample is
    written once."""
    media = tmp_path / "poison_media"
    media.mkdir()
    image = (CORPUS / "media" / "images" / "astronaut.jpg").read_bytes()
    (media / "poison.jpg").write_bytes(image + POISON)  # still a valid JPEG to Pillow
    poison = tmp_path / "poison.jsonl"
    segments = [{"type": "image", "path": "poison.jpg"}, {"type": "text", "text": "A poison."}]
    builders.write_jsonl(poison, [{"id": "poisoned", "segments": segments}])
    inputs = [
        {"uri": str(CORPUS / "docs.jsonl"), "format": "jsonl", "name": "corpus"},
        {"uri": str(poison), "format": "jsonl", "name": "poison", "media_root": str(media)},
    ]
    config = pipeline_config(
        tmp_path / "ws", inputs, tokenizers=QUICK_TOKENIZERS, pretokenize={"max_restarts": 1}
    )
    shard.run(config)
    use_tokenizers(tokens_workspace, tmp_path / "ws")
    config_path = tmp_path / "config.json"
    config_path.write_text(config.model_dump_json())
    hook = {"worker_process_setup_hook": "tests.pipelines.crash_hook.install"}
    report = run_stage_in_own_ray("pretokenize", config_path, f"runtime_env={hook!r}")
    assert report["quarantined"] == {"decoder_crashed": 1}
    rows = pq.read_table(tmp_path / "ws" / "tokens" / "quarantine.parquet").to_pylist()
    assert [(r["native_id"], r["reason"]) for r in rows] == [("poisoned", "decoder_crashed")]
    assert "worker process died" in rows[0]["detail"]
    keys = all_keys(tmp_path / "ws" / "tokens")
    assert len(keys) == len(set(keys)) == sum(EXPECTED.values())
    assert not any(key.startswith("poison") for key in keys)


def test_actors_request_a_gpu_when_the_cluster_has_one(sample_run: tuple, tmp_path: Path) -> None:
    """A separate Ray instance with one logical GPU: the actor gets it, runs on CPU."""
    config, _, tokens = sample_run
    config_path = tmp_path / "config.json"
    workspace = tmp_path / "ws"
    shutil.copytree(tokens.parent / "shards", workspace / "shards")
    use_tokenizers(tokens.parent, workspace)
    data = json.loads(config.model_dump_json())
    data["workspace"] = str(workspace)
    data["pretokenize"]["actors"] = 1
    config_path.write_text(json.dumps(data))
    report = run_stage_in_own_ray("pretokenize", config_path, "num_gpus=1")
    assert (report["devices"], report["gpu_ids"]) == (["cpu"], ["0"])  # GPU assigned, no CUDA


def test_an_s3_workspace_end_to_end(
    ray_cluster: None, moto_server: MotoServer, mlflow_server: MlflowServer, s3_env: str
) -> None:
    upload_folder(moto_server, "pretokenize-s3", "raw/corpus", CORPUS)
    config = pipeline_config(
        "s3://pretokenize-s3/ws",
        [{"uri": "s3://pretokenize-s3/raw/corpus/docs.jsonl", "format": "jsonl"}],
        tokenizers=QUICK_TOKENIZERS,
        storage={"s3": {"endpoint_url": s3_env}},
        mlflow={"tracking_uri": mlflow_server.tracking_uri, "experiment": "pretokenize-s3"},
    )
    shard.run(config)
    tokenizers_stage.run(config)
    report = pretokenize.run(config)
    assert {b: c["samples"] for b, c in report.buckets.items()} == EXPECTED
    client = moto_server.s3_client()
    listed = client.list_objects_v2(Bucket="pretokenize-s3", Prefix="ws/tokens/")["Contents"]
    keys = {item["Key"] for item in listed}
    assert {"ws/tokens/_SUCCESS.json", "ws/tokens/manifest.parquet", "ws/tokens/stats.json"} <= keys
    assert not any(
        f"/{leftover}/" in key for key in keys for leftover in ("_done", "_staged", "_packed")
    )
    tars = sorted(f"s3://pretokenize-s3/{k}" for k in keys if k.startswith("ws/tokens/text2audio/"))
    options = {"client_kwargs": {"endpoint_url": s3_env}}
    samples = list(read_token_samples(tars, storage_options=options))
    assert len(samples) == EXPECTED["text2audio"]
    assert all(s.meta["bucket"] == "text2audio" for s in samples)
    assert pretokenize.run(config).skipped
