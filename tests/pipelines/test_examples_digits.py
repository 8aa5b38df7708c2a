"""``omni examples digits``: a deterministic, valid, consistently labelled corpus whose eval
voices are never heard in train, and a pretokenize stage that keeps its splits and labels."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from infra.storage import Storage, StorageConfig
from pipelines.cli import app
from pipelines.examples import speech
from pipelines.examples.digits import limited
from pipelines.examples.images import load_digit_images
from pipelines.examples.words import DIGIT_WORDS, number_words, with_article
from pipelines.pretokenize import stage as pretokenize
from pipelines.pretokenize.worker import sample_meta
from pipelines.shard import stage as shard
from pipelines.shard.config import ShardConfig
from pipelines.shard.media_checks import MediaLimits
from pipelines.shard.readers.base import Split
from pipelines.shard.readers.jsonl import JsonlReader
from pipelines.shard.validation import TokenCosts, accept
from tests.conftest import REPO, pipeline_config
from tokenization.audio import decode_audio
from tokenization.token_samples import read_token_samples, split_of
from tokenization.video import read_frames

runner = CliRunner()
LIMIT = 40  # documents per task: every medium and both splits, in a few seconds


def build(out: Path, *options: str) -> str:
    result = runner.invoke(app, ["examples", "digits", "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    return result.output


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def documents(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "docs.jsonl").read_text().splitlines()]


def texts(document: dict) -> list[str]:
    return [s["text"] for s in document["segments"] if s["type"] == "text"]


def paths(document: dict, kind: str) -> list[str]:
    return [s["path"] for s in document["segments"] if s["type"] == kind]


def image_index(path: str) -> int:
    return int(Path(path).stem)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "corpus"
    build(out, "--limit", str(LIMIT))
    return out


@pytest.fixture(scope="module")
def digits():
    return load_digit_images()


def test_the_same_options_give_the_same_bytes_and_a_rebuild_replaces(
    corpus: Path, tmp_path: Path
) -> None:
    other = tmp_path / "again"
    build(other, "--limit", str(LIMIT))
    first, second = file_hashes(corpus), file_hashes(other)
    assert first == second
    assert sum(name.endswith(".wav") for name in first) == LIMIT  # one per speech document
    build(other, "--limit", str(LIMIT), "--seed", "1")  # an earlier build is replaced
    assert file_hashes(other)["docs.jsonl"] != first["docs.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no staging or old copy left


def test_every_task_has_both_splits_and_the_summary_counts_them(corpus: Path) -> None:
    counts = Counter((d["task"], d["split"]) for d in documents(corpus))
    for task in ("caption", "speech", "video", "interleaved"):
        assert counts[(task, "train")] > 0 and counts[(task, "eval")] > 0
        assert counts[(task, "train")] + counts[(task, "eval")] == LIMIT
    readme = (corpus / "README.md").read_text()
    assert f"| caption | {counts[('caption', 'train')]} | {counts[('caption', 'eval')]} |" in readme
    assert "CC BY 4.0" in (corpus / "LICENSES.md").read_text()
    assert "GPL-3.0" in (corpus / "LICENSES.md").read_text()


def test_every_document_passes_the_shard_validation(corpus: Path) -> None:
    """The shard stage's own reader and ``accept``: every medium decodes, none escapes."""
    settings = ShardConfig()
    limits = MediaLimits(
        settings.max_image_pixels, settings.max_media_bytes, settings.video_probe_frames
    )
    costs = TokenCosts(
        settings.text_bytes_per_token,
        settings.tokens_per_image,
        settings.audio_tokens_per_second,
        settings.video_frames,
        settings.audio_seconds_estimate,
    )
    storage = Storage(StorageConfig())
    uri = str(corpus / "docs.jsonl")
    split = Split("jsonl", uri, "digits", str(corpus), end=(corpus / "docs.jsonl").stat().st_size)
    rows = [accept(raw, storage, limits, costs) for raw in JsonlReader().read(storage, split)]
    assert len(rows) == 4 * LIMIT
    metadata = [json.loads(row["metadata"]) for row in rows]
    assert all(m["split"] in ("train", "eval") and m["task"] for m in metadata)


def test_media_decode_with_the_pipeline_readers_in_the_tokenizers_formats(corpus: Path) -> None:
    images = sorted((corpus / "media" / "images").glob("*.png"))
    from PIL import Image

    with Image.open(images[0]) as image:
        assert image.size == (64, 64) and image.mode == "L"
    clip = sorted((corpus / "media" / "audio").glob("*.wav"))[0]
    with wave.open(str(clip)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
    samples, rate = decode_audio(clip.read_bytes())
    assert rate == 16000 and 0.3 < len(samples) / rate < 3.0 and np.abs(samples).max() > 0.5
    movie = sorted((corpus / "media" / "video").glob("*.mp4"))[0]
    frames = read_frames(movie.read_bytes(), 8)  # decord, as pretokenize reads videos
    assert frames.shape == (8, 64, 64, 3)
    ink = 255.0 - frames.mean(axis=3)  # (8, H, W): where the digit is
    grid = np.indices(ink.shape[1:])  # (2, H, W): row and column of every pixel
    centres = np.einsum("fhw,chw->fc", ink, grid) / ink.sum(axis=(1, 2))[:, None]  # (8, 2)
    moved = np.abs(centres[-1] - centres[0]).max()
    assert moved > 10  # the digit drifts across the frame


def named_digits(text: str) -> set[int]:
    """The digits a text names, as words or numerals."""
    tokens = re.findall(r"[a-z]+|[0-9]+", text)
    return {DIGIT_WORDS.index(t) if t in DIGIT_WORDS else int(t) for t in tokens
            if t in DIGIT_WORDS or t.isdigit()}  # fmt: skip


def test_labels_captions_and_media_agree(corpus: Path, digits) -> None:
    for document in documents(corpus):
        task, label = document["task"], document.get("label")
        words = " ".join(texts(document))
        if task in ("caption", "video"):
            assert named_digits(words) == {int(label)}
            # the third word, always: DFM at the demo's size learns one place (words.py)
            assert named_digits(words.split()[2]) == {int(label)}, words
            [medium] = paths(document, "image") or paths(document, "video")
            if task == "caption":
                assert digits.labels[image_index(medium)] == int(label)
                assert digits.split[image_index(medium)] == document["split"]
            else:
                assert document["direction"] in words.split()
        elif task == "speech":
            assert texts(document) == [number_words(int(label))]
            assert document["voice"].endswith("+" + document["variant"])
        elif document["kind"] == "sum":
            a, b, total = document["digits"]
            assert a + b == total and "label" not in document
            assert [digits.labels[image_index(p)] for p in paths(document, "image")] == [
                a,
                b,
                total,
            ]
            assert named_digits(words) == {a, b, total}
        else:
            [image] = paths(document, "image")
            assert digits.labels[image_index(image)] == int(label)
            assert named_digits(words) == {int(label)}


def test_caption_templates_keeps_the_first_n_of_each_task_and_changes_nothing_else(
    corpus: Path, tmp_path: Path
) -> None:
    """The default draws from every template; ``--caption-templates 1`` captions every
    image and video with the first one, and the other documents stay byte for byte."""
    shapes = {(d["task"], caption_shape(d)) for d in documents(corpus) if d["task"] != "speech"}
    assert len({s for t, s in shapes if t == "caption"}) > 4
    build(tmp_path / "one", "--limit", str(LIMIT), "--no-speech", "--caption-templates", "1")
    build(tmp_path / "all", "--limit", str(LIMIT), "--no-speech")
    one, every = documents(tmp_path / "one"), documents(tmp_path / "all")
    assert {caption_shape(d) for d in one if d["task"] == "caption"} == {"a handwritten W"}
    assert {caption_shape(d) for d in one if d["task"] == "video"} == {"a handwritten W drifting D"}
    assert [d for d in one if d["task"] == "interleaved"] == [
        d for d in every if d["task"] == "interleaved"
    ]
    assert "one template" in (tmp_path / "one" / "README.md").read_text()
    result = runner.invoke(app, ["examples", "digits", "--out", str(tmp_path / "bad"),
                                 "--caption-templates", "0"])  # fmt: skip
    assert result.exit_code == 2 and "--caption-templates must be >= 1" in result.output


def caption_shape(document: dict) -> str:
    """The caption with its digit as W (a word), N (a numeral) or A (with its article), and
    a video's direction as D."""
    text = " ".join(texts(document))
    for digit in range(10):
        text = re.sub(rf"\b{re.escape(with_article(number_words(digit)))}\b", "A", text)
        text = re.sub(rf"\b{number_words(digit)}\b", "W", text)
        text = re.sub(rf"\b{digit}\b", "N", text)
    return re.sub(r"\b(left|right|up|down)\b", "D", text)


def test_eval_voices_and_images_are_never_seen_in_train(corpus: Path, digits) -> None:
    docs = documents(corpus)
    transcripts = {p: texts(d)[0] for d in docs if d["task"] == "speech" for p in paths(d, "audio")}
    voices = {"train": set(), "eval": set()}
    clips = {"train": set(), "eval": set()}
    for document in docs:
        for path in paths(document, "audio"):
            voices[document["split"]].add(document["variant"])
            clips[document["split"]].add(path)
        if document["task"] == "interleaved":
            for path in paths(document, "image"):
                assert digits.split[image_index(path)] == document["split"]
        if document.get("kind") == "spoken_written":
            [clip] = paths(document, "audio")
            assert transcripts[clip] == DIGIT_WORDS[int(document["label"])]
    assert voices["eval"] and voices["eval"] <= set(speech.EVAL_VARIANTS)
    assert voices["train"] and not voices["train"] & voices["eval"]
    assert not clips["train"] & clips["eval"]


def test_the_default_corpus_plan_holds_out_a_sixth_of_images_and_a_fifth_of_voices(
    digits,
) -> None:
    eval_share = np.mean(digits.split == "eval")
    assert 0.15 < eval_share < 0.2
    for digit in range(10):  # stratified: every digit is held out alike
        assert len(digits.indices(digit, "eval")) >= 25
    planned = speech.plan_clips(np.random.default_rng(0), 2, 4)
    by_split = Counter(clip.split for clip, _ in planned)
    assert by_split["eval"] == 8 * 24 and by_split["train"] == 32 * 24
    assert {label for clip, label in planned if clip.split == "eval"} >= set("0123456789")


def test_digits_come_from_scikit_learns_load_digits(digits) -> None:
    from sklearn.datasets import load_digits

    reference = load_digits()
    assert np.array_equal(digits.cells * 16, reference.images)
    assert np.array_equal(digits.labels, reference.target)


def test_limited_keeps_each_splits_share_evenly_spaced() -> None:
    items = [("train", i) for i in range(90)] + [("eval", i) for i in range(10)]
    kept = limited(items, 20, lambda item: item[0])
    assert Counter(split for split, _ in kept) == {"train": 18, "eval": 2}
    assert [i for split, i in kept if split == "eval"] == [0, 9]
    assert Counter(s for s, _ in limited(items[:95], 5, lambda item: item[0]))["eval"] == 1
    assert limited(items, None, lambda item: item[0]) == items


def test_number_words_and_articles() -> None:
    assert [with_article(w) for w in ("one", "seven", "eight", "eleven")] == [
        "a one", "a seven", "an eight", "an eleven"
    ]  # fmt: skip
    assert [number_words(n) for n in (0, 7, 13, 40, 42, 99)] == [
        "zero", "seven", "thirteen", "forty", "forty two", "ninety nine"
    ]  # fmt: skip


def test_without_the_extra_the_error_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "espeakng_loader" else real_find_spec(name, *a),
    )
    result = runner.invoke(app, ["examples", "digits", "--out", str(tmp_path / "c")])
    assert result.exit_code == 1
    assert "omni-dfm[examples]" in result.output and "--no-speech" in result.output
    assert not (tmp_path / "c").exists()
    build(tmp_path / "silent", "--no-speech", "--limit", "6")
    tasks = Counter(d["task"] for d in documents(tmp_path / "silent"))
    assert tasks == {"caption": 6, "video": 6, "interleaved": 6}


def test_a_directory_that_is_not_a_corpus_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["examples", "digits", "--out", str(tmp_path), "--limit", "4"])
    assert result.exit_code == 1 and "not empty" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    result = runner.invoke(app, ["examples", "digits", "--out", str(tmp_path / "x"),
                                 "--image-size", "63"])  # fmt: skip
    assert result.exit_code == 2 and "--image-size" in result.output


def test_espeak_ng_is_loaded_by_the_speech_module_only() -> None:
    """GPL-3.0 stays behind the extra: no other module names it, and the CLI does not
    import it, numpy or torch until a build runs."""
    mentions = [
        path.relative_to(REPO)
        for package in ("infra", "tokenization", "training", "evaluation", "pipelines")
        for path in (REPO / package).rglob("*.py")
        if "espeakng_loader" in path.read_text()
    ]
    assert mentions == [Path("pipelines/examples/speech.py")]
    probe = (
        "import sys; import pipelines.examples.cli; "
        "print(sorted(m for m in ('espeakng_loader', 'numpy', 'torch', 'sklearn') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stdout.strip() == "[]"


def test_sample_meta_keeps_a_declared_split_and_the_label() -> None:
    row = {"id": "0123abcd", "native_id": "n", "origin": "docs.jsonl@0"}
    hashed = split_of("0123abcd", 0.5)
    other = "eval" if hashed == "train" else "train"
    declared = sample_meta(
        {**row, "metadata": json.dumps({"split": other, "label": "7"})}, "L", 0.5
    )
    assert declared["split"] == other and declared["label"] == "7"
    plain = sample_meta({**row, "metadata": json.dumps({"task": "caption"})}, "L", 0.5)
    assert plain["split"] == hashed and "label" not in plain
    odd = sample_meta({**row, "metadata": json.dumps({"split": "test"})}, "L", 0.5)
    assert odd["split"] == hashed


@pytest.mark.integration
@pytest.mark.timeout(600)  # alone, the session's tokenizers are built first (~2 min)
def test_pretokenize_keeps_declared_splits_and_labels(
    tmp_path: Path, tokens_workspace: Path
) -> None:
    """shard -> pretokenize on a small corpus (with the session's tokenizers, trained on the
    sample corpus): nothing quarantined, every bucket filled, and each token sample carries
    its document's split and label, even where the eval_fraction's hash would not."""
    corpus = tmp_path / "corpus"
    build(corpus, "--limit", "12")
    config = pipeline_config(
        tmp_path / "ws",
        [{"uri": str(corpus / "docs.jsonl"), "format": "jsonl"}],
        pretokenize={"eval_fraction": 0.5},
    )
    assert shard.run(config).quarantined == {}
    shutil.copytree(tokens_workspace / "tokenizers", tmp_path / "ws" / "tokenizers")
    report = pretokenize.run(config)
    assert report.quarantined == {}
    by_native_id = {d["id"]: d for d in documents(corpus)}
    samples = list(
        read_token_samples(sorted(str(p) for p in (tmp_path / "ws/tokens").glob("*/*.tar")))
    )
    buckets = Counter(sample.meta["bucket"] for sample in samples)
    assert set(buckets) == {"image2text", "text2image", "audio2text", "text2audio",
                            "video2text", "text2video", "interleaved"}  # fmt: skip
    for tar in (tmp_path / "ws/tokens").glob("*/*.tar"):  # a tar holds its own split only
        assert {s.meta["split"] for s in read_token_samples([str(tar)])} == {tar.name[:-11]}
    disagreeing = 0
    for sample in samples:
        document = by_native_id[sample.meta["native_id"]]
        assert sample.meta["split"] == document["split"]
        assert sample.meta.get("label") == document.get("label")
        disagreeing += split_of(sample.meta["document_id"], 0.5) != document["split"]
    assert disagreeing > len(samples) / 4  # the hash alone would have split them otherwise
