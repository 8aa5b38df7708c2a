"""The Document contract between raw-corpus readers and the shard stage.

A reader turns one input split into :class:`RawDocument` values: segments as found in the
input (text, embedded bytes, or a media path relative to the corpus root). The shard stage
then resolves paths, validates every segment and stores accepted documents with their media
embedded, so later stages never read the raw corpus again.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, Literal

SegmentType = Literal["text", "image", "audio", "video"]
SEGMENT_TYPES: tuple[str, ...] = ("text", "image", "audio", "video")

# File extensions (lower case, no dot) per media type: the webdataset reader keys on them
# and validators use them to pick a decoder.
MEDIA_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"),
    "audio": ("wav", "flac", "mp3", "ogg", "opus", "m4a"),
    "video": ("mp4", "webm", "mkv", "avi", "mov"),
}


class Rejected(Exception):  # noqa: N818 - reads as "raise Rejected(reason, detail)"
    """A document cannot be accepted. ``reason`` is a short stable code for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class RawDocument:
    """One document as a reader found it, before validation.

    ``origin`` locates it in the input (``file@byte-offset``, ``file#row=N``, ``file#key``)
    so a quarantined document can be found again. ``rejection`` is set when the reader
    itself could not parse the document (malformed JSON, unsafe tar member ...).
    """

    native_id: str
    origin: str
    id_namespace: str
    segments: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    media_root: str | None = None
    rejection: Rejected | None = None

    @property
    def id(self) -> str:
        return stable_id(self.id_namespace, self.native_id)


def stable_id(namespace: str, native_id: str) -> str:
    """A document id that is the same on every run, machine and storage backend.

    ``namespace`` is the input's name plus the file's path relative to the input's base,
    so the same corpus read from a local copy or from S3 gives the same ids, and equal
    native ids in different inputs do not collide.
    """
    digest = hashlib.sha1(f"{namespace}\x00{native_id}".encode()).hexdigest()
    return digest[:20]


def signature(segments: list[dict[str, Any]]) -> str:
    """The modality signature: the sorted set of segment types, e.g. ``image+text``."""
    return "+".join(sorted({segment["type"] for segment in segments}))


def extension_of(name: str) -> str:
    """Lower-case extension of a file or member name, without the dot."""
    return posixpath.splitext(name)[1].lstrip(".").lower()


def media_type_of(extension: str) -> str | None:
    """``image``/``audio``/``video`` for a known media extension, else None."""
    for media_type, extensions in MEDIA_EXTENSIONS.items():
        if extension in extensions:
            return media_type
    return None


def check_relative_media_path(path: str) -> str:
    """Normalise a media path from a document; absolute paths and ``..`` are rejected.

    A document must not be able to make the pipeline read outside its corpus root
    (``/etc/passwd``, ``../../secrets``), whatever the storage backend.
    """
    if not isinstance(path, str) or not path:
        raise Rejected("bad_segment", "media segment without a path")
    if "\x00" in path or "\\" in path:
        raise Rejected("media_path_escapes_root", f"unsafe characters in {path!r}")
    if path.startswith("/") or "://" in path or (len(path) > 1 and path[1] == ":"):
        raise Rejected("media_path_escapes_root", f"absolute path {path!r}")
    normalised = posixpath.normpath(path)
    if normalised == ".." or normalised.startswith("../") or "/../" in f"/{normalised}/":
        raise Rejected("media_path_escapes_root", f"{path!r} leaves the corpus root")
    return normalised


def corpus_metadata(document: dict[str, Any]) -> dict[str, Any]:
    """A shard row's ``metadata`` column (the reader's extra fields, as JSON) as a dict."""
    try:
        metadata = json.loads(document.get("metadata") or "{}")
    except json.JSONDecodeError:
        return {}
    return metadata if isinstance(metadata, dict) else {}
