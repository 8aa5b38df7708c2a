"""Interleaved documents as JSON lines: ``{"id", "segments": [...], ...metadata}``.

Media paths are relative to the file's directory (the corpus root). A file is cut into
byte ranges; a line belongs to the range its first byte falls in, so ranges can be read
independently (no pre-scan of the file) and every line is read exactly once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from infra.storage import Storage
from pipelines.shard.documents import RawDocument, Rejected
from pipelines.shard.media_checks import decode_utf8
from pipelines.shard.readers.base import Split, SplitOptions


class JsonlReader:
    format = "jsonl"
    whole_file_shards = False

    def splits(
        self, storage: Storage, uri: str, namespace: str, media_root: str, options: SplitOptions
    ) -> list[Split]:
        size = storage.size(uri)
        step = options.jsonl_split_bytes
        return [
            Split(self.format, uri, namespace, media_root, part=i, start=s, end=min(s + step, size))
            for i, s in enumerate(range(0, max(size, 1), step))
        ]

    def read(self, storage: Storage, split: Split) -> Iterator[RawDocument]:
        with storage.open(split.uri, "rb") as handle:
            position = split.start
            if position > 0:
                handle.seek(position - 1)
                if handle.read(1) != b"\n":
                    handle.readline()  # the line in progress belongs to the previous split
                position = handle.tell()
            while position < split.end:
                line = handle.readline()
                if not line:
                    break
                offset, position = position, position + len(line)
                if line.strip():
                    yield self._parse(line, offset, split)

    def scan(self, storage: Storage, split: Split) -> Iterator[RawDocument]:
        """Media are paths here, so reading is already cheap."""
        return self.read(storage, split)

    def _parse(self, line: bytes, offset: int, split: Split) -> RawDocument:
        origin = f"{split.uri}@{offset}"
        fallback_id = f"@{offset}"
        try:
            record = json.loads(decode_utf8(line))
        except Rejected as rejected:
            return RawDocument(fallback_id, origin, split.namespace, rejection=rejected)
        except json.JSONDecodeError as exc:
            return RawDocument(
                fallback_id, origin, split.namespace, rejection=Rejected("malformed_json", str(exc))
            )
        if not isinstance(record, dict):
            return RawDocument(
                fallback_id,
                origin,
                split.namespace,
                rejection=Rejected("malformed_json", "a line must hold a JSON object"),
            )
        native_id = record.pop("id", None)
        segments = record.pop("segments", None)
        document = RawDocument(
            str(native_id) if native_id is not None else fallback_id,
            origin,
            split.namespace,
            metadata=record,
            media_root=split.media_root,
        )
        if not isinstance(segments, list) or not all(isinstance(s, dict) for s in segments):
            document.rejection = Rejected("bad_segment", "'segments' must be a list of objects")
        else:
            document.segments = segments
        return document
