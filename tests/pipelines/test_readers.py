"""Each reader on the sample corpus and on files of the other formats built from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.storage import Storage
from pipelines.readers import READERS, SplitOptions
from tests import builders

STORAGE = Storage()


def read_file(fmt: str, uri: str, options: SplitOptions, media_root: str = "") -> list:
    reader = READERS[fmt]
    splits = reader.splits(STORAGE, uri, f"test/{Path(uri).name}", media_root, options)
    return [doc for split in splits for doc in reader.read(STORAGE, split)]


@pytest.mark.parametrize("split_bytes", [1, 97, 4096, 1 << 20])
def test_jsonl_byte_ranges_read_every_line_exactly_once(
    sample_corpus: Path, split_bytes: int
) -> None:
    uri = str(sample_corpus / "docs.jsonl")
    docs = read_file("jsonl", uri, SplitOptions(split_bytes, 16), str(sample_corpus))
    expected = [json.loads(line)["id"] for line in (sample_corpus / "docs.jsonl").open()]
    assert [d.native_id for d in docs] == expected
    assert all(d.rejection is None and d.segments for d in docs)
    assert docs[0].metadata["license"] and "segments" not in docs[0].metadata


def test_jsonl_bad_lines_become_rejections_not_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"id": "ok", "segments": [{"type": "text", "text": "fine"}]}\n'
        b"{not json\n"
        b'{"id": "latin1", "segments": [{"type": "text", "text": "caf\xe9"}]}\n'
        b"[1, 2]\n"
        b'{"id": "noseg", "segments": "text"}\n'
        b"\n"
    )
    docs = read_file("jsonl", str(path), SplitOptions(1 << 20, 16), str(tmp_path))
    reasons = [d.rejection.reason if d.rejection else None for d in docs]
    assert reasons == [None, "malformed_json", "invalid_utf8", "malformed_json", "bad_segment"]
    assert docs[1].origin.endswith("@61")  # byte offset of the bad line


def test_obelics_reader_aligns_texts_and_images(tmp_path: Path, sample_corpus: Path) -> None:
    uri = tmp_path / "obelics.parquet"
    ids = builders.build_obelics_parquet(sample_corpus, uri)
    docs = read_file("obelics", str(uri), SplitOptions(1 << 20, 7))
    assert [d.native_id for d in docs] == ids
    source = {d["id"]: d for d in builders.read_docs(sample_corpus)}
    for doc in docs:
        assert [s["type"] for s in doc.segments] == [
            s["type"] for s in source[doc.native_id]["segments"]
        ]
        assert doc.metadata["url"].endswith(doc.native_id)
        images = [s for s in doc.segments if s["type"] == "image"]
        assert images and all(s["bytes"][:2] == b"\xff\xd8" for s in images)


def test_obelics_rejects_misaligned_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": ["both", "short"],
            "texts": [["a", None], ["a"]],
            "images": [[b"x", None], [None, b"y"]],
        }
    )
    pq.write_table(table, tmp_path / "bad.parquet")
    docs = read_file("obelics", str(tmp_path / "bad.parquet"), SplitOptions(1, 16))
    assert [d.rejection.reason for d in docs] == ["misaligned_row", "misaligned_row"]


def test_obelics_requires_its_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="missing column"):
        read_file("obelics", str(tmp_path / "x.parquet"), SplitOptions(1, 16))


def test_webdataset_reader_groups_members_by_key(tmp_path: Path, sample_corpus: Path) -> None:
    uri = tmp_path / "shard.tar"
    keys = builders.build_webdataset_tar(sample_corpus, uri)
    docs = read_file("webdataset", str(uri), SplitOptions(1, 1))
    assert [d.native_id for d in docs] == keys
    for doc in docs:
        assert doc.rejection is None
        assert len(doc.segments) == 2 and doc.segments[-1]["type"] == "text"
        assert doc.metadata["id"]
    kinds = {d.segments[0]["type"] for d in docs}
    assert kinds == {"image", "audio", "video"}


def test_webdataset_unsafe_members_and_duplicate_keys(tmp_path: Path, sample_corpus: Path) -> None:
    jpg = (sample_corpus / "media/images/coffee.jpg").read_bytes()
    uri = tmp_path / "evil.tar"
    builders.build_tar(
        uri,
        [
            ("000.jpg", jpg),
            ("000.txt", b"coffee"),
            ("../evil.jpg", jpg),
            ("/abs.txt", b"x"),
            ("001.txt", b"\xff\xfe bad utf8"),
            ("000.json", b"{}"),
        ],
    )
    docs = read_file("webdataset", str(uri), SplitOptions(1, 1))
    found = sorted((d.native_id, d.rejection.reason if d.rejection else "") for d in docs)
    assert found == sorted(
        [
            ("000", ""),
            ("../evil.jpg", "unsafe_tar_member"),
            ("/abs.txt", "unsafe_tar_member"),
            ("001", "invalid_utf8"),
            ("000", "duplicate_id"),  # a key that comes back later is not a continuation
        ]
    )
