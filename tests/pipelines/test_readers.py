"""Each reader on the sample corpus and on files of the other formats built from it."""

from __future__ import annotations

import json
import tarfile
import warnings
from pathlib import Path

import pytest

from infra.storage import Storage
from pipelines.shard.readers import READERS, InputWarning, SplitOptions
from tests import builders

STORAGE = Storage()
SAMPLE_MEDIA = Path(__file__).resolve().parents[2] / "examples" / "corpus" / "media"


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


def webdataset_docs(uri: Path) -> tuple[list, list[warnings.WarningMessage]]:
    """The documents of one tar and the InputWarnings its reading gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = read_file("webdataset", str(uri), SplitOptions(1, 1))
    return docs, [w for w in caught if issubclass(w.category, InputWarning)]


def test_webdataset_sorted_tar_reads_without_warning(tmp_path: Path, sample_corpus: Path) -> None:
    uri = tmp_path / "sorted.tar"
    builders.build_webdataset_tar(sample_corpus, uri)
    _, caught = webdataset_docs(uri)
    assert caught == []


def test_webdataset_scattered_members_are_grouped_by_key_with_one_warning(
    tmp_path: Path, sample_corpus: Path
) -> None:
    samples = builders.webdataset_samples(sample_corpus)
    members = builders.scattered(builders.tar_members(samples))
    uri = tmp_path / "unsorted.tar"
    builders.build_tar(uri, [("shard/", b"")] + [(f"shard/{n}", d) for n, d in members])

    docs, caught = webdataset_docs(uri)
    assert sorted(d.native_id for d in docs) == sorted(f"shard/{key}" for key in samples)
    for doc in docs:
        sample = samples[doc.native_id.removeprefix("shard/")]
        assert doc.rejection is None
        assert [s["type"] for s in doc.segments][-1] == "text"
        assert doc.segments[-1]["text"] == sample["txt"].decode()
        assert doc.segments[0]["bytes"] == next(
            d for k, d in sample.items() if k in ("jpg", "wav", "mp4")
        )
        assert doc.metadata["key"] == doc.native_id.removeprefix("shard/")
    assert len(caught) == 1
    assert str(uri) in str(caught[0].message) and "WebDataset order" in str(caught[0].message)


def test_webdataset_true_duplicate_rejects_only_its_key(tmp_path: Path) -> None:
    jpg = (SAMPLE_MEDIA / "images/coffee.jpg").read_bytes()
    uri = tmp_path / "dup.tar"
    builders.build_tar(uri, [
        ("000.jpg", jpg), ("000.txt", b"first"),
        ("001.jpg", jpg), ("001.txt", b"second"), ("001.JPG", jpg),
        ("002.jpg", jpg), ("002.txt", b"third"),
    ])  # fmt: skip
    docs, _ = webdataset_docs(uri)
    found = [(d.native_id, d.rejection.reason if d.rejection else "") for d in docs]
    assert found == [("000", ""), ("001", "duplicate_id"), ("002", "")]
    assert "'001.JPG' appears twice" in docs[1].rejection.detail


def test_webdataset_unsafe_members_reject_their_key_once(tmp_path: Path) -> None:
    jpg = (SAMPLE_MEDIA / "images/coffee.jpg").read_bytes()
    uri = tmp_path / "evil.tar"
    builders.build_tar(
        uri,
        [
            ("000.jpg", jpg),
            ("000.txt", b"coffee"),
            ("../evil.jpg", jpg),
            ("../evil.txt", b"x"),
            ("/abs.txt", b"x"),
            ("001.txt", b"\xff\xfe bad utf8"),
            ("000.json", b"{}"),
        ],
    )
    docs, _ = webdataset_docs(uri)
    found = [(d.native_id, d.rejection.reason if d.rejection else "") for d in docs]
    assert found == [
        ("000", ""),
        ("../evil", "unsafe_tar_member"),
        ("/abs", "unsafe_tar_member"),
        ("001", "invalid_utf8"),
    ]
    assert docs[0].metadata == {} and [s["type"] for s in docs[0].segments] == ["image", "text"]


def test_webdataset_truncated_tar_keeps_the_samples_before_the_cut(tmp_path: Path) -> None:
    jpg = (SAMPLE_MEDIA / "images/coffee.jpg").read_bytes()
    whole = tmp_path / "whole.tar"
    builders.build_tar(whole, [("000.jpg", jpg), ("000.txt", b"a"), ("001.jpg", jpg)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: -len(jpg) // 2])
    reader = READERS["webdataset"]
    [split] = reader.splits(STORAGE, str(cut), "test/cut.tar", "", SplitOptions(1, 1))
    docs = list(reader.read(STORAGE, split))
    assert [d.native_id for d in docs] == ["000", "001"]
    assert docs[0].rejection is None and len(docs[0].segments) == 2
    assert docs[1].rejection.reason == "unreadable_input"
    assert "'001.jpg'" in docs[1].rejection.detail


def test_webdataset_tar_broken_between_members_raises_after_its_samples(tmp_path: Path) -> None:
    """A pax header followed by a header with a bad checksum: tarfile raises in the member
    list (not in a member's data), after sample 000 was read whole."""
    jpg = (SAMPLE_MEDIA / "images/coffee.jpg").read_bytes()
    whole = tmp_path / "whole.tar"
    long_name = "d" * 120 + "/001.jpg"  # more than 100 characters: written with a pax header
    builders.build_tar(whole, [("000.jpg", jpg), ("000.txt", b"a"), (long_name, jpg)])
    data = bytearray(whole.read_bytes())
    header = (data.index(b" path=") // 512 + 1) * 512  # the block after the pax record
    data[header + 148 : header + 156] = b"garbage!"  # its checksum field
    broken = tmp_path / "broken.tar"
    broken.write_bytes(bytes(data))
    reader = READERS["webdataset"]
    [split] = reader.splits(STORAGE, str(broken), "test/broken.tar", "", SplitOptions(1, 1))
    docs = []
    with pytest.raises(tarfile.ReadError):
        docs.extend(reader.read(STORAGE, split))
    assert [(d.native_id, d.rejection) for d in docs] == [("000", None)]
