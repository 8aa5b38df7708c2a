"""img2dataset / video2dataset tars: ``KEY.jpg|mp4|wav...`` with ``KEY.txt`` and ``KEY.json``.

Members of one sample must be adjacent (the WebDataset convention); a key that comes back
later in the tar is a duplicate, not a continuation. Member names are never used as file
system paths, but unsafe ones (absolute, ``..``, links, devices) are rejected anyway:
such a tar was not written by a well-behaved tool.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator

from infra.storage import Storage
from pipelines.documents import RawDocument, Rejected, extension_of, media_type_of
from pipelines.media_checks import decode_utf8
from pipelines.readers.base import Split, SplitOptions


def sample_key(name: str) -> tuple[str, str]:
    """``dir/000001.seg.jpg`` -> (``dir/000001``, ``seg.jpg``): the WebDataset split."""
    directory, base = posixpath.split(name)
    stem, _, suffix = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, suffix


def unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    """Why a member must not be trusted, or None if it is a plain, relative file."""
    name = member.name
    if not member.isfile():
        return f"{name!r} is not a regular file"
    if name.startswith("/") or "\\" in name or "\x00" in name:
        return f"{name!r} is an absolute or non-POSIX name"
    if ".." in name.split("/"):
        return f"{name!r} contains '..'"
    return None


class WebDatasetReader:
    """Tars are read whole: img2dataset and video2dataset already write balanced shards."""

    format = "webdataset"
    whole_file_shards = True

    def splits(
        self, storage: Storage, uri: str, namespace: str, media_root: str, options: SplitOptions
    ) -> list[Split]:
        return [Split(self.format, uri, namespace, media_root)]

    def read(self, storage: Storage, split: Split) -> Iterator[RawDocument]:
        seen: set[str] = set()
        current_key: str | None = None
        members: dict[str, bytes] = {}
        with (
            storage.open(split.uri, "rb") as handle,
            tarfile.open(fileobj=handle, mode="r|*") as tar,
        ):
            for member in tar:
                reason = unsafe_member_reason(member)
                if reason:
                    yield RawDocument(
                        member.name,
                        f"{split.uri}#{member.name}",
                        split.namespace,
                        rejection=Rejected("unsafe_tar_member", reason),
                    )
                    continue
                key, suffix = sample_key(member.name)
                if key != current_key:
                    if current_key is not None:
                        yield self._document(current_key, members, split)
                    if key in seen:
                        yield RawDocument(
                            key,
                            f"{split.uri}#{key}",
                            split.namespace,
                            rejection=Rejected("duplicate_id", f"key {key!r} appears twice"),
                        )
                        current_key, members = None, {}
                        continue
                    seen.add(key)
                    current_key, members = key, {}
                extracted = tar.extractfile(member)
                members[suffix.lower()] = extracted.read() if extracted else b""
            if current_key is not None:
                yield self._document(current_key, members, split)

    def scan(self, storage: Storage, split: Split) -> Iterator[RawDocument]:
        raise NotImplementedError("tars are whole-file shards and are never scanned")

    def _document(self, key: str, members: dict[str, bytes], split: Split) -> RawDocument:
        document = RawDocument(key, f"{split.uri}#{key}", split.namespace)
        try:
            if "json" in members:
                metadata = json.loads(decode_utf8(members["json"]))
                document.metadata = metadata if isinstance(metadata, dict) else {"json": metadata}
            for suffix, data in sorted(members.items()):
                media_type = media_type_of(extension_of(f"x.{suffix}"))
                if media_type:
                    document.segments.append(
                        {"type": media_type, "bytes": data, "ext": extension_of(f"x.{suffix}")}
                    )
            if "txt" in members:
                document.segments.append({"type": "text", "text": decode_utf8(members["txt"])})
        except Rejected as rejected:
            document.rejection = rejected
        except json.JSONDecodeError as exc:
            document.rejection = Rejected("malformed_json", f"{key}.json: {exc}")
        return document
