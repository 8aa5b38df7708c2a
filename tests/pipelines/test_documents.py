"""The Document contract: path safety, signatures, stable ids."""

from __future__ import annotations

import pytest

from pipelines.shard.documents import Rejected, check_relative_media_path, signature, stable_id


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../secret.jpg", "media/../../x.jpg", "..", "s3://b/x.jpg", "C:/x.png",
             "media\\..\\x.jpg", "a\x00.jpg", ""],
)  # fmt: skip
def test_media_paths_may_not_escape_the_corpus_root(path: str) -> None:
    with pytest.raises(Rejected) as rejected:
        check_relative_media_path(path)
    assert rejected.value.reason in ("media_path_escapes_root", "bad_segment")


def test_safe_relative_paths_are_normalised() -> None:
    assert check_relative_media_path("media/./images/a.jpg") == "media/images/a.jpg"
    assert check_relative_media_path("media/x/../a.jpg") == "media/a.jpg"


def test_signature_is_the_sorted_set_of_types() -> None:
    segments = [{"type": "text"}, {"type": "image"}, {"type": "text"}, {"type": "audio"}]
    assert signature(segments) == "audio+image+text"


def test_stable_id_depends_on_namespace_and_native_id_only() -> None:
    assert stable_id("corpus/docs.jsonl", "a") == stable_id("corpus/docs.jsonl", "a")
    assert stable_id("corpus/docs.jsonl", "a") != stable_id("other/docs.jsonl", "a")
    assert len(stable_id("n", "a")) == 20
