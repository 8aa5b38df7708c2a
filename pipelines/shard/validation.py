"""Turning a :class:`RawDocument` into an accepted shard row, or a quarantine reason.

Media paths are resolved against the corpus root (never outside it), media are loaded
and decoded once here, and the row embeds the bytes so no later stage reads the raw
corpus again. The token estimate drives shard balancing only; the pretokenize stage
counts real tokens.

An empty or whitespace-only text segment is dropped and its document kept while any
segment remains: an image whose caption is empty (img2dataset writes ``KEY.txt`` empty
when the source had none) is an image-only document, still good for tokenizer training
and unconditional generation. A document left with no segment is ``no_segments``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from infra.storage import Storage, join
from pipelines.shard.documents import (
    SEGMENT_TYPES,
    RawDocument,
    Rejected,
    check_relative_media_path,
    extension_of,
    signature,
)
from pipelines.shard.media_checks import CHECKS, MediaInfo, MediaLimits, check_text, decode_utf8


@dataclass(frozen=True)
class TokenCosts:
    """Rough tokens per unit of each modality, for balancing shards before tokenizing."""

    text_bytes_per_token: float
    tokens_per_image: int
    audio_tokens_per_second: float
    video_frames: int
    audio_seconds_estimate: float

    def estimate(self, raw: RawDocument) -> int:
        """Tokens of a document not yet validated: media are counted, not decoded.

        Used to plan balanced shards before the expensive pass; audio length is unknown
        until decoded, so each clip counts ``audio_seconds_estimate`` seconds.
        """
        info = MediaInfo(seconds=self.audio_seconds_estimate)
        total = 0
        for segment in raw.segments:
            text = segment.get("text") if isinstance(segment.get("text"), str) else ""
            size = len(text.encode("utf-8", "replace"))
            total += self.of(segment.get("type", "text"), size, info)
        return total

    def of(self, segment_type: str, size: int, info: MediaInfo) -> int:
        if segment_type == "text":
            return max(1, math.ceil(size / self.text_bytes_per_token))
        if segment_type == "image":
            return self.tokens_per_image
        if segment_type == "audio":
            return max(1, math.ceil(info.seconds * self.audio_tokens_per_second))
        return self.video_frames * self.tokens_per_image


def _load_media(storage: Storage, raw: RawDocument, segment: dict[str, Any]) -> tuple[bytes, str]:
    if segment.get("bytes") is not None:
        return segment["bytes"], segment.get("ext") or ""
    path = check_relative_media_path(segment.get("path"))
    if raw.media_root is None:
        raise Rejected("bad_segment", "media path given where the format embeds bytes")
    try:
        return storage.read_bytes(join(raw.media_root, path)), extension_of(path)
    except FileNotFoundError:
        raise Rejected("media_missing", f"{path} not found under the corpus root") from None
    except IsADirectoryError:
        raise Rejected("media_missing", f"{path} is a directory") from None


def _text_of(storage: Storage, raw: RawDocument, segment: dict[str, Any], position: int) -> str:
    """A text segment's text: inline ``text``, else the UTF-8 file at ``path`` (some
    interleaved exports store long texts in files beside the media)."""
    if "text" in segment or segment.get("path") is None:
        return check_text(segment.get("text"))
    data, _ = _load_media(storage, raw, segment)
    try:
        return check_text(decode_utf8(data))
    except Rejected as rejected:
        raise Rejected(
            rejected.reason, f"segment {position} ({segment['path']}): {rejected.detail}"
        ) from None


def accept(
    raw: RawDocument, storage: Storage, limits: MediaLimits, costs: TokenCosts
) -> dict[str, Any]:
    """Validate every segment of ``raw``; return its shard row or raise :class:`Rejected`.

    The row's ``segments`` leave out the empty text segments of ``raw``.
    """
    if raw.rejection is not None:
        raise raw.rejection
    if not raw.segments:
        raise Rejected("no_segments", "document has no segments")
    segments, tokens = [], 0
    for position, segment in enumerate(raw.segments):
        kind = segment.get("type")
        if kind not in SEGMENT_TYPES:
            raise Rejected("bad_segment", f"segment {position} has unknown type {kind!r}")
        if kind == "text":
            text = _text_of(storage, raw, segment, position)
            if not text.strip():
                continue
            size, info, data, ext = len(text.encode("utf-8")), MediaInfo(), None, ""
        else:
            data, ext = _load_media(storage, raw, segment)
            try:
                info = CHECKS[kind](data, limits)
            except Rejected as rejected:
                raise Rejected(rejected.reason, f"segment {position}: {rejected.detail}") from None
            text, size = None, len(data)
        tokens += costs.of(kind, size, info)
        segments.append(
            {
                "type": kind,
                "text": text,
                "bytes": data,
                "ext": ext,
                "path": segment.get("path"),
                "width": info.width,
                "height": info.height,
                "seconds": info.seconds,
            }
        )
    if not segments:
        raise Rejected("no_segments", f"all {len(raw.segments)} text segment(s) are empty")
    return {
        "id": raw.id,
        "native_id": raw.native_id,
        "origin": raw.origin,
        "signature": signature(segments),
        "est_tokens": tokens,
        "segments": segments,
        "metadata": json.dumps(raw.metadata, default=str),
    }
