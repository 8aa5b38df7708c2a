"""``omni shard`` end to end on a real local Ray instance (and a real moto S3 server)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from infra.services import MotoServer
from infra.storage import Storage, StorageError
from pipelines.shard import stage as shard
from pipelines.shard.plan import ScanContext, scan_file
from pipelines.shard.readers import READERS, SplitOptions
from tests import builders
from tests.conftest import SAMPLE_CORPUS, pipeline_config, run_stage_in_own_ray, upload_folder
from tests.pipelines.crash_hook import POISON

pytestmark = pytest.mark.integration
COSTS = shard._token_costs(shard.ShardConfig(target_tokens=4000))


def shard_rows(stage_dir: Path) -> list[dict]:
    """Every document row of every part file, in shard order."""
    rows = []
    for part in sorted(stage_dir.glob("part-*.parquet")):
        rows += pq.read_table(part).to_pylist()
    return rows


def quarantine_reasons(stage_dir: Path) -> Counter:
    return Counter(pq.read_table(stage_dir / "quarantine.parquet")["reason"].to_pylist())


def test_sample_corpus_is_sharded_completely_and_balanced(
    ray_cluster: None, sample_corpus: Path, tmp_path: Path
) -> None:
    config = pipeline_config(tmp_path / "ws", [{"uri": str(sample_corpus / "docs.jsonl"),
                                                "format": "jsonl"}])  # fmt: skip
    report = shard.run(config)
    stage_dir = tmp_path / "ws" / "shards"

    native_ids = [json.loads(line)["id"] for line in (sample_corpus / "docs.jsonl").open()]
    rows = shard_rows(stage_dir)
    assert sorted(r["native_id"] for r in rows) == sorted(native_ids)
    assert len({r["id"] for r in rows}) == len(rows) == report.documents_out == 374
    assert report.quarantined == {} and report.documents_in == 374
    assert report.signatures == {"audio+text": 16, "image+text": 52, "text": 300, "text+video": 6}

    astronaut = next(r for r in rows if r["native_id"] == "imgcap-astronaut")
    image = next(s for s in astronaut["segments"] if s["type"] == "image")
    assert image["bytes"] == (sample_corpus / "media/images/astronaut.jpg").read_bytes()
    assert (image["width"], image["height"], image["ext"]) == (384, 384, "jpg")
    assert json.loads(astronaut["metadata"])["license"] == "Public domain (NASA)"

    manifest = pq.read_table(stage_dir / "manifest.parquet").to_pylist()
    assert len(manifest) == report.shards >= 5
    for entry in manifest:
        data = (stage_dir / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
        assert pq.read_metadata(stage_dir / entry["path"]).num_rows == entry["documents"]
    planned = [entry["planned_tokens"] for entry in manifest]
    splits = READERS["jsonl"].splits(Storage(), str(sample_corpus / "docs.jsonl"), "corpus/d",
                                     str(sample_corpus), SplitOptions(2048, 16))  # fmt: skip
    scans = scan_file({"splits": [s.to_row() for s in splits]}, ScanContext(Storage(), COSTS))
    largest_split = max(scan["est_tokens"] for scan in scans["scans"])
    assert sum(planned) == sum(scan["est_tokens"] for scan in scans["scans"])
    mean = sum(planned) / len(planned)
    assert all(abs(t - mean) <= largest_split for t in planned), planned  # no greedy runt
    assert sum(entry["est_tokens"] for entry in manifest) == report.est_tokens

    success = json.loads((stage_dir / "_SUCCESS.json").read_text())
    assert success["stage"] == "shard" and success["documents_out"] == 374
    leftovers = {"_stats", "_quarantine", "_RUNNING.json"} & {p.name for p in stage_dir.iterdir()}
    assert not leftovers

    again = shard.run(config)
    assert again.skipped and again.documents_out == 374
    assert "nothing to do" in again.notes[0]

    changed = pipeline_config(tmp_path / "ws", config.corpus.model_dump()["inputs"],
                              shard={"target_tokens": 100_000})  # fmt: skip
    rebuilt = shard.run(changed)
    assert not rebuilt.skipped and rebuilt.shards == 1 and "rebuilt" in rebuilt.notes[0]
    assert len(list(stage_dir.glob("part-*.parquet"))) == 1  # stale parts are gone


def _bad_corpus(root: Path, sample_corpus: Path) -> list[dict]:
    """A JSONL corpus with one document per failure mode, plus two good ones."""
    media = root / "media"
    shutil.copytree(sample_corpus / "media", media)
    jpg = (media / "images/chelsea.jpg").read_bytes()
    (media / "broken.jpg").write_bytes(builders.corrupt_jpeg(jpg))
    (media / "bomb.png").write_bytes(builders.png_bomb_header())
    (media / "broken.wav").write_bytes(builders.truncated_wav((media / "audio/cards_001.wav")
                                                             .read_bytes()))  # fmt: skip
    (media / "silent-empty.wav").write_bytes(builders.empty_wav())
    (media / "broken.mp4").write_bytes(builders.truncated_mp4((media / "video/bikes.mp4")
                                                             .read_bytes()))  # fmt: skip
    (root.parent / "outside.jpg").write_bytes(jpg)

    def doc(doc_id: str, *segments: dict) -> dict:
        return {"id": doc_id, "segments": list(segments)}

    text = {"type": "text", "text": "a caption"}
    return [
        doc("good-image", {"type": "image", "path": "media/images/chelsea.jpg"}, text),
        doc("good-text", text),
        doc("corrupt-image", {"type": "image", "path": "media/broken.jpg"}, text),
        doc("bomb", {"type": "image", "path": "media/bomb.png"}, text),
        doc("corrupt-audio", {"type": "audio", "path": "media/broken.wav"}, text),
        doc("empty-audio", {"type": "audio", "path": "media/silent-empty.wav"}, text),
        doc("corrupt-video", {"type": "video", "path": "media/broken.mp4"}, text),
        doc("escape-dotdot", {"type": "image", "path": "../outside.jpg"}, text),
        doc("escape-absolute", {"type": "image", "path": str(root.parent / "outside.jpg")}),
        doc("missing-media", {"type": "image", "path": "media/nope.jpg"}, text),
        doc("no-segments"),
        doc("unknown-type", {"type": "smell", "text": "?"}),
        doc("good-image", text),  # duplicate id
    ]


def test_bad_inputs_are_quarantined_with_reasons_and_the_stage_finishes(
    ray_cluster: None, sample_corpus: Path, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs_path = corpus / "docs.jsonl"
    builders.write_jsonl(docs_path, _bad_corpus(corpus, sample_corpus))
    with docs_path.open("ab") as handle:
        handle.write(b"{broken json\n")
        handle.write(b'{"id": "surrogate", "segments": [{"type": "text", "text": "a \\ud800"}]}\n')
        handle.write(b'{"id": "latin-1", "segments": [{"type": "text", "text": "caf\xe9"}]}\n')
    tar = tmp_path / "laion" / "00000.tar"
    tar.parent.mkdir()
    keys = builders.build_webdataset_tar(sample_corpus, tar)
    builders.add_tar_member(tar, "../../escape.txt", b"hello")
    obelics = tmp_path / "obelics" / "part.parquet"
    obelics.parent.mkdir()
    obelics_ids = builders.build_obelics_parquet(sample_corpus, obelics, n_docs=10)

    config = pipeline_config(tmp_path / "ws", [
        {"uri": str(docs_path), "format": "jsonl"},
        {"uri": str(tmp_path / "laion" / "{00000..00000}.tar"), "format": "webdataset"},
        {"uri": str(tmp_path / "obelics" / "*.parquet"), "format": "obelics"},
    ], shard={"jsonl_split_bytes": 256})  # fmt: skip
    report = shard.run(config)
    stage_dir = tmp_path / "ws" / "shards"

    expected = {
        "image_decode_error": 1, "image_too_large": 1, "audio_decode_error": 1,
        "empty_media": 1, "video_decode_error": 1, "media_path_escapes_root": 2,
        "media_missing": 1, "no_segments": 1, "bad_segment": 1, "invalid_utf8": 2,
        "duplicate_id": 1, "malformed_json": 1, "unsafe_tar_member": 1,
    }  # fmt: skip
    assert report.quarantined == expected
    assert quarantine_reasons(stage_dir) == expected
    quarantine = pq.read_table(stage_dir / "quarantine.parquet").to_pylist()
    assert all(q["stage"] == "shard" and q["source"] and q["detail"] for q in quarantine)
    bomb = next(q for q in quarantine if q["native_id"] == "bomb")
    assert "100000x100000" in bomb["detail"] and bomb["source"].startswith(str(docs_path))

    rows = shard_rows(stage_dir)
    accepted = Counter(r["native_id"] for r in rows)
    assert accepted["good-image"] == 1 and accepted["good-text"] == 1
    assert set(keys) <= set(accepted) and set(obelics_ids) <= set(accepted)
    assert report.documents_out == len(rows) == 2 + len(keys) + len(obelics_ids)
    assert report.documents_in == report.documents_out + sum(expected.values())


def test_a_medium_that_crashes_its_decoder_is_quarantined_alone(
    ray_cluster: None, tmp_path: Path
) -> None:
    """An image whose check aborts the worker process (like a native segfault) on every
    try: its shard is still written, with that document alone quarantined."""
    media = tmp_path / "media"
    media.mkdir()
    image = (SAMPLE_CORPUS / "media" / "images" / "astronaut.jpg").read_bytes()
    (media / "poison.jpg").write_bytes(image + POISON)  # still a valid JPEG to Pillow
    docs = [{"id": f"doc-{n}", "segments": [{"type": "text", "text": f"Text {n}."}]}
            for n in range(6)]  # fmt: skip
    docs.insert(3, {"id": "poisoned", "segments": [{"type": "image", "path": "poison.jpg"}]})
    builders.write_jsonl(tmp_path / "docs.jsonl", docs)
    inputs = [{"uri": str(tmp_path / "docs.jsonl"), "format": "jsonl", "media_root": str(media)}]
    config = pipeline_config(tmp_path / "ws", inputs, shard={"task_retries": 1})
    config_path = tmp_path / "config.json"
    config_path.write_text(config.model_dump_json())
    hook = {"worker_process_setup_hook": "tests.pipelines.crash_hook.install"}
    report = run_stage_in_own_ray("shard", config_path, f"runtime_env={hook!r}")
    assert report["quarantined"] == {"decoder_crashed": 1}
    assert report["documents_out"] == 6
    rows = pq.read_table(tmp_path / "ws" / "shards" / "quarantine.parquet").to_pylist()
    assert [(r["native_id"], r["reason"]) for r in rows] == [("poisoned", "decoder_crashed")]


def test_missing_input_fails_fast_naming_the_field(ray_cluster: None, tmp_path: Path) -> None:
    config = pipeline_config(tmp_path / "ws", [
        {"uri": str(tmp_path / "exists.jsonl"), "format": "jsonl"},
        {"uri": str(tmp_path / "raw" / "*.tar"), "format": "webdataset"},
    ])  # fmt: skip
    (tmp_path / "exists.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match=r"corpus\.inputs\[1\]\.uri: no such file"):
        shard.run(config)
    assert not (tmp_path / "ws" / "shards").exists()


def test_s3_input_and_s3_workspace_give_the_same_documents_as_local(
    ray_cluster: None, moto_server: MotoServer, s3_env: str, sample_corpus: Path, tmp_path: Path
) -> None:
    upload_folder(moto_server, "shard-s3", "raw/corpus", sample_corpus)
    obelics = tmp_path / "obelics.parquet"
    builders.build_obelics_parquet(sample_corpus, obelics, n_docs=6)
    moto_server.s3_client().put_object(
        Bucket="shard-s3", Key="raw/obelics/a.parquet", Body=obelics.read_bytes()
    )
    tar = tmp_path / "00000.tar"
    tar_keys = builders.build_webdataset_tar(sample_corpus, tar)
    moto_server.s3_client().put_object(
        Bucket="shard-s3", Key="raw/laion/00000.tar", Body=tar.read_bytes()
    )
    storage = {"s3": {"endpoint_url": s3_env}}
    remote = pipeline_config("s3://shard-s3/ws", [
        {"uri": "s3://shard-s3/raw/corpus/docs.jsonl", "format": "jsonl"},
        {"uri": "s3://shard-s3/raw/obelics/*.parquet", "format": "obelics"},
        {"uri": "s3://shard-s3/raw/laion/{00000..00000}.tar", "format": "webdataset"},
    ], storage=storage)  # fmt: skip
    report = shard.run(remote)
    assert report.documents_out == 374 + 6 + len(tar_keys) and report.quarantined == {}

    client = moto_server.s3_client()
    listed = client.list_objects_v2(Bucket="shard-s3", Prefix="ws/shards/")["Contents"]
    names = sorted(item["Key"].rsplit("/", 1)[1] for item in listed)
    assert names == sorted(
        ["_SUCCESS.json", "manifest.parquet", "quarantine.parquet"]
        + [f"part-{i:05d}.parquet" for i in range(report.shards)]
    )
    remote_ids = set()
    for name in names:
        if name.startswith("part-"):
            body = client.get_object(Bucket="shard-s3", Key=f"ws/shards/{name}")["Body"].read()
            local_copy = tmp_path / name
            local_copy.write_bytes(body)
            remote_ids |= set(pq.read_table(local_copy, columns=["id"])["id"].to_pylist())

    local = pipeline_config(tmp_path / "ws", [{"uri": str(sample_corpus / "docs.jsonl"),
                                               "format": "jsonl"}])  # fmt: skip
    shard.run(local)
    local_ids = {r["id"] for r in shard_rows(tmp_path / "ws" / "shards")}
    assert local_ids < remote_ids  # same corpus name, same stable ids, wherever it is stored
    assert shard.run(remote).skipped


def test_unreachable_s3_endpoint_fails_fast(ray_cluster: None, s3_env: str, tmp_path: Path) -> None:
    config = pipeline_config(tmp_path / "ws", [{"uri": "s3://b/docs.jsonl", "format": "jsonl"}],
                             storage={"s3": {"endpoint_url": "http://127.0.0.1:9"},
                                      "retries": 2, "backoff_s": 0.05})  # fmt: skip
    with pytest.raises(StorageError, match="cannot reach S3 endpoint http://127.0.0.1:9"):
        shard.run(config)


def _mixed_corpus(root: Path) -> tuple[list[dict], dict[str, str], dict[str, str]]:
    """Every case of the shard inputs that used to lose data, side by side: inputs, the
    native ids that must be accepted with their signature, and the rejected ones with their
    reason (ids prefixed with their input's name)."""
    accepted, rejected = {}, {}

    captions = builders.webdataset_samples(SAMPLE_CORPUS)
    media_only = builders.blank_every_third_caption(captions)
    (root / "img2dataset").mkdir()
    builders.build_tar(root / "img2dataset" / "00000.tar", builders.tar_members(captions))
    media = {"jpg": "image", "wav": "audio", "mp4": "video"}
    captioned = {}  # key -> signature with its caption, e.g. "image+text", "text+video"
    for key, members in captions.items():
        (kind,) = (media[suffix] for suffix in members if suffix in media)
        captioned[key] = "+".join(sorted([kind, "text"]))
        accepted[f"img2dataset/{key}"] = media_only.get(key, captioned[key])

    unsorted = builders.webdataset_samples(SAMPLE_CORPUS)
    (root / "unsorted").mkdir()
    members = builders.scattered(builders.tar_members(unsorted))
    members = [("part/", b"")] + [(f"part/{name}", data) for name, data in members]
    builders.build_tar(root / "unsorted" / "00000.tar", members)
    for key in unsorted:
        accepted[f"unsorted/part/{key}"] = captioned[key]

    duplicated = builders.webdataset_samples(SAMPLE_CORPUS)
    members = builders.tar_members(duplicated)
    first = members.index(("000001.jpg", duplicated["000001"]["jpg"]))
    members.insert(first + 1, members[first])  # the same member twice, in WebDataset order
    (root / "duplicated").mkdir()
    builders.build_tar(root / "duplicated" / "00000.tar", members)
    for key in duplicated:
        if key != "000001":
            accepted[f"duplicated/{key}"] = captioned[key]
    rejected["duplicated/000001"] = "duplicate_id"

    jsonl = root / "interleaved"
    shutil.copytree(SAMPLE_CORPUS / "media", jsonl / "media")
    wav = (jsonl / "media/audio/goforward.wav").read_bytes()
    (jsonl / "media/cut.wav").write_bytes(wav[:44])  # the header promises 2.786 s
    (jsonl / "texts").mkdir()
    (jsonl / "texts/essay.txt").write_text("A long essay about coffee.\n" * 50, encoding="utf-8")
    (jsonl / "texts/latin1.txt").write_bytes("Un caf\xe9 cr\xe8me".encode("latin-1"))
    image = {"type": "image", "path": "media/images/coffee.jpg"}
    docs = [
        {"id": "empty-segment", "segments": [{"type": "text", "text": "Coffee:"}, image,
                                             {"type": "text", "text": "  "}]},
        {"id": "text-by-path", "segments": [image, {"type": "text", "path": "texts/essay.txt"}]},
        {"id": "text-by-path-latin1", "segments": [{"type": "text", "path": "texts/latin1.txt"}]},
        {"id": "truncated-wav", "segments": [{"type": "audio", "path": "media/cut.wav"},
                                             {"type": "text", "text": "Go forward."}]},
        {"id": "only-empty-texts", "segments": [{"type": "text", "text": ""}]},
    ]  # fmt: skip
    builders.write_jsonl(jsonl / "docs.jsonl", docs)
    accepted |= {
        "interleaved/empty-segment": "image+text",
        "interleaved/text-by-path": "image+text",
    }
    rejected |= {
        "interleaved/text-by-path-latin1": "invalid_utf8",
        "interleaved/truncated-wav": "audio_truncated",
        "interleaved/only-empty-texts": "no_segments",
    }
    inputs = [
        {"uri": str(root / name / "00000.tar"), "format": "webdataset"}
        for name in ("img2dataset", "unsorted", "duplicated")
    ] + [{"uri": str(jsonl / "docs.jsonl"), "format": "jsonl"}]
    return inputs, accepted, rejected


def test_a_mixed_corpus_loses_no_valid_document_and_rejects_each_bad_one_once(
    ray_cluster: None, tmp_path: Path
) -> None:
    inputs, accepted, rejected = _mixed_corpus(tmp_path)
    report = shard.run(pipeline_config(tmp_path / "ws", inputs))
    stage_dir = tmp_path / "ws" / "shards"

    def named(origin: str, native_id: str) -> str:
        """``<input folder>/<native id>``, as the corpus builder names documents."""
        return f"{Path(origin).relative_to(tmp_path).parts[0]}/{native_id}"

    rows = shard_rows(stage_dir)
    names = [named(r["origin"], r["native_id"]) for r in rows]
    assert sorted(names) == sorted(accepted)  # each exactly once
    assert {name: r["signature"] for name, r in zip(names, rows, strict=True)} == accepted
    quarantine = pq.read_table(stage_dir / "quarantine.parquet").to_pylist()
    by_name = {named(q["source"], q["native_id"]): q for q in quarantine}
    assert (
        len(quarantine) == len(by_name) and {n: q["reason"] for n, q in by_name.items()} == rejected
    )
    assert not {q["id"] for q in quarantine} & {r["id"] for r in rows}  # never both
    assert report.quarantined == dict(Counter(rejected.values()))
    assert report.documents_in == len(accepted) + len(rejected)

    cut = by_name["interleaved/truncated-wav"]["detail"]
    assert "declares 2.786 s (44580 frames)" in cut and "only 0.000 s (0 frames)" in cut
    essay = next(r for r in rows if r["native_id"] == "text-by-path")["segments"][1]
    assert essay["text"] == "A long essay about coffee.\n" * 50
    kept = next(r for r in rows if r["native_id"] == "empty-segment")["segments"]
    assert [s["type"] for s in kept] == ["text", "image"]
    media_only = [
        n for n, sig in accepted.items() if n.startswith("img2dataset/") and "+" not in sig
    ]
    assert len(media_only) == 19  # a third of 57; 7 of them have no .txt at all
    assert report.empty_text_segments == 19 - 7 + 1
    disorder = [note for note in report.notes if "WebDataset order" in note]
    assert len(disorder) == 1 and str(tmp_path / "unsorted" / "00000.tar") in disorder[0]
