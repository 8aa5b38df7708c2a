"""``accept``: one raw document in, its shard row or one rejection out."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.storage import Storage
from pipelines.shard import stage as shard
from pipelines.shard.documents import RawDocument, Rejected
from pipelines.shard.media_checks import MediaLimits
from pipelines.shard.validation import accept

LIMITS = MediaLimits(max_image_pixels=50_000_000, max_media_bytes=64 * 2**20, video_probe_frames=2)
COSTS = shard._token_costs(shard.ShardConfig())
CORPUS = Path(__file__).resolve().parents[2] / "examples" / "corpus"
IMAGE = {"type": "image", "path": "media/images/coffee.jpg"}


def raw(*segments: dict, media_root: Path = CORPUS) -> RawDocument:
    return RawDocument("doc", "test#doc", "test/docs.jsonl", list(segments), {}, str(media_root))


def rejected(document: RawDocument) -> Rejected:
    with pytest.raises(Rejected) as caught:
        accept(document, Storage(), LIMITS, COSTS)
    return caught.value


@pytest.mark.parametrize("caption", ["", "   ", "\n\t "])
def test_an_empty_caption_leaves_a_media_only_document(caption: str) -> None:
    row = accept(raw(IMAGE, {"type": "text", "text": caption}), Storage(), LIMITS, COSTS)
    assert row["signature"] == "image"
    assert [s["type"] for s in row["segments"]] == ["image"]
    assert row["est_tokens"] == COSTS.tokens_per_image


def test_empty_text_segments_of_an_interleaved_document_are_dropped() -> None:
    document = raw(
        {"type": "text", "text": "Before."},
        {"type": "text", "text": ""},
        IMAGE,
        {"type": "text", "text": " \n "},
        {"type": "text", "text": "After."},
    )
    row = accept(document, Storage(), LIMITS, COSTS)
    assert [(s["type"], s["text"]) for s in row["segments"]] == [
        ("text", "Before."),
        ("image", None),
        ("text", "After."),
    ]
    assert row["signature"] == "image+text"


def test_a_document_of_empty_texts_only_has_no_segments() -> None:
    reason = rejected(raw({"type": "text", "text": ""}, {"type": "text", "text": "  "}))
    assert reason.reason == "no_segments" and "2 text segment(s) are empty" in reason.detail


def test_a_text_segment_may_point_to_a_utf8_file(tmp_path: Path) -> None:
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "long.txt").write_text("Un café, long texte.\n", encoding="utf-8")
    (tmp_path / "texts" / "latin1.txt").write_bytes("Un caf\xe9".encode("latin-1"))
    (tmp_path / "texts" / "empty.txt").write_bytes(b"\n")
    (tmp_path / "coffee.jpg").write_bytes((CORPUS / IMAGE["path"]).read_bytes())
    image = {"type": "image", "path": "coffee.jpg"}

    row = accept(
        raw(image, {"type": "text", "path": "texts/long.txt"}, media_root=tmp_path),
        Storage(),
        LIMITS,
        COSTS,
    )
    text = row["segments"][1]
    assert (text["type"], text["text"], text["path"]) == (
        "text",
        "Un café, long texte.\n",
        "texts/long.txt",
    )

    invalid = rejected(
        raw(image, {"type": "text", "path": "texts/latin1.txt"}, media_root=tmp_path)
    )
    assert invalid.reason == "invalid_utf8" and "texts/latin1.txt" in invalid.detail
    empty = accept(
        raw(image, {"type": "text", "path": "texts/empty.txt"}, media_root=tmp_path),
        Storage(),
        LIMITS,
        COSTS,
    )
    assert empty["signature"] == "image"
    missing = rejected(raw({"type": "text", "path": "texts/none.txt"}, media_root=tmp_path))
    assert missing.reason == "media_missing"
    escape = rejected(raw({"type": "text", "path": "../secret.txt"}, media_root=tmp_path))
    assert escape.reason == "media_path_escapes_root"
