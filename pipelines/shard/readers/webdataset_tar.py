"""img2dataset / video2dataset tars: ``KEY.jpg|mp4|wav...`` with ``KEY.txt`` and ``KEY.json``.

Members are grouped by key over the whole tar, not by adjacency: ``tar cf x.tar dir/``
without sorting scatters a sample's members (``0001.jpg``, ``0000.jpg``, ``0001.txt``), and
such a tar is read whole, with one :class:`~pipelines.shard.readers.base.InputWarning` saying it
is not in WebDataset order (plain WebDataset readers would mis-group it). A tar is one
shard, bounded in size, so it is read in one sequential pass (local, ``s3://``,
compressed alike) and its samples are held until the pass ends.

Every key is one document with one fate: accepted whole, or rejected once with the first
reason found (a member extension that appears twice, an unsafe member, undecodable
``.txt``/``.json``). A missing or empty ``.txt`` leaves a media-only document. Member names
are never used as file system paths, but unsafe ones (absolute, ``..``, links, devices) are
rejected anyway: such a tar was not written by a well-behaved tool. Directory entries carry
no data and are skipped.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

from infra.storage import Storage
from pipelines.shard.documents import RawDocument, Rejected, extension_of, media_type_of
from pipelines.shard.media_checks import decode_utf8
from pipelines.shard.readers.base import InputWarning, Split, SplitOptions


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


@dataclass
class _Sample:
    """The members of one key, by lower-case suffix, and the first reason to reject it."""

    members: dict[str, bytes] = field(default_factory=dict)
    rejection: Rejected | None = None

    def reject(self, rejection: Rejected) -> None:
        if self.rejection is None:
            self.rejection = rejection
        self.members.clear()  # a rejected sample's bytes are not needed


class WebDatasetReader:
    """Tars are read whole: img2dataset and video2dataset already write balanced shards."""

    format = "webdataset"
    whole_file_shards = True

    def splits(
        self, storage: Storage, uri: str, namespace: str, media_root: str, options: SplitOptions
    ) -> list[Split]:
        return [Split(self.format, uri, namespace, media_root)]

    def read(self, storage: Storage, split: Split) -> Iterator[RawDocument]:
        """One document per key, in the order keys first appear in the tar.

        A tar that breaks mid-read (truncated, corrupt compression) still gives the
        samples read before the break; the sample whose member broke is rejected as
        ``unreadable_input``. A break between members raises after the samples, so the
        caller can report the rest of the file.
        """
        samples: dict[str, _Sample] = {}
        broken: Exception | None = None
        in_order, previous_key = True, None
        in_progress: tarfile.TarInfo | None = None
        with storage.open(split.uri, "rb") as handle:
            try:
                with tarfile.open(fileobj=handle, mode="r|*") as tar:
                    for member in tar:
                        if member.isdir():
                            continue
                        key, suffix = sample_key(member.name)
                        in_order = in_order and (key == previous_key or key not in samples)
                        previous_key, in_progress = key, member
                        self._add(samples.setdefault(key, _Sample()), member, suffix.lower(), tar)
                        in_progress = None
            except tarfile.TarError as exc:
                if in_progress is None:
                    broken = exc
                else:
                    samples[previous_key].reject(
                        Rejected("unreadable_input", f"member {in_progress.name!r}: {exc}")
                    )
        if not in_order:
            warnings.warn(
                f"{split.uri}: the members of a sample are not adjacent (not in WebDataset "
                "order); read here grouped by key over the whole tar, but plain WebDataset "
                "readers would mis-group them",
                InputWarning,
                stacklevel=2,
            )
        for key, sample in samples.items():
            yield self._document(key, sample, split)
        if broken is not None:
            raise broken

    def scan(self, storage: Storage, split: Split) -> Iterator[RawDocument]:
        raise NotImplementedError("tars are whole-file shards and are never scanned")

    @staticmethod
    def _add(sample: _Sample, member: tarfile.TarInfo, suffix: str, tar: tarfile.TarFile) -> None:
        reason = unsafe_member_reason(member)
        if reason:
            sample.reject(Rejected("unsafe_tar_member", reason))
        elif suffix in sample.members:
            sample.reject(Rejected("duplicate_id", f"member {member.name!r} appears twice"))
        elif sample.rejection is None:
            extracted = tar.extractfile(member)
            sample.members[suffix] = extracted.read() if extracted else b""

    @staticmethod
    def _document(key: str, sample: _Sample, split: Split) -> RawDocument:
        document = RawDocument(key, f"{split.uri}#{key}", split.namespace)
        if sample.rejection is not None:
            document.rejection = sample.rejection
            return document
        members = sample.members
        try:
            if "json" in members:
                metadata = json.loads(decode_utf8(members["json"]))
                document.metadata = metadata if isinstance(metadata, dict) else {"json": metadata}
            for suffix, data in sorted(members.items()):
                extension = extension_of(f"x.{suffix}")
                media_type = media_type_of(extension)
                if media_type:
                    document.segments.append({"type": media_type, "bytes": data, "ext": extension})
            if "txt" in members:
                document.segments.append({"type": "text", "text": decode_utf8(members["txt"])})
        except Rejected as rejected:
            document.rejection = rejected
        except json.JSONDecodeError as exc:
            document.rejection = Rejected("malformed_json", f"{key}.json: {exc}")
        return document
