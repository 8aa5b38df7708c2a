"""The ``corpus`` config section and the expansion of its inputs into concrete files."""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from typing import Literal

from braceexpand import braceexpand
from pydantic import Field

from infra.config import Section
from infra.storage import Storage, StorageError, is_remote

_GLOB_CHARS = re.compile(r"[*?\[]")


class InputSpec(Section):
    """One raw input: a file, a glob (``*.parquet``) or a brace range (``{00000..00099}.tar``)."""

    uri: str = Field(min_length=1)
    format: Literal["jsonl", "obelics", "webdataset"]
    name: str | None = Field(
        None, description="namespace of this input's document ids; default: its folder's name"
    )
    media_root: str | None = Field(
        None, description="where relative media paths resolve; default: each file's folder"
    )


class CorpusConfig(Section):
    """The ``corpus`` section: any number of inputs, in any mix of formats."""

    inputs: list[InputSpec] = Field(min_length=1)


@dataclass(frozen=True)
class InputFile:
    """One concrete file of an input, with what the shard stage needs to read it."""

    uri: str
    format: str
    namespace: str  # "<input name>/<path relative to the input's base folder>"
    media_root: str
    size: int
    version: str  # mtime or ETag: part of the stage fingerprint


def absolute(uri: str) -> str:
    """Local paths become absolute (Ray workers may run elsewhere); URIs stay as they are."""
    if is_remote(uri):
        return uri
    return os.path.abspath(uri.removeprefix("file://"))


def _base_folder(pattern: str) -> str:
    """The folder part of a pattern before its first glob character."""
    head = _GLOB_CHARS.split(pattern, maxsplit=1)[0]
    return posixpath.dirname(head) if "://" in pattern else os.path.dirname(head)


def expand_inputs(corpus: CorpusConfig, storage: Storage) -> list[InputFile]:
    """Every file named by the inputs, in config order; fails fast on a missing input.

    Raises ``FileNotFoundError`` naming the ``corpus.inputs[i].uri`` field, or
    ``StorageError`` when the storage backend cannot be reached.
    """
    files: list[InputFile] = []
    for index, spec in enumerate(corpus.inputs):
        field = f"corpus.inputs[{index}].uri"
        for pattern in braceexpand(absolute(spec.uri)):
            base = _base_folder(pattern)
            name = spec.name or posixpath.basename(base.rstrip("/")) or "corpus"
            try:
                matches = storage.glob(pattern) if _GLOB_CHARS.search(pattern) else [pattern]
                matches = [m for m in matches if storage.exists(m) and not storage.isdir(m)]
            except PermissionError as exc:
                raise StorageError(f"{field}: permission denied for {pattern}: {exc}") from exc
            if not matches:
                raise FileNotFoundError(f"{field}: no such file: {pattern}")
            for uri in matches:
                info = storage.info(uri)
                relative = uri[len(base) :].lstrip("/") if uri.startswith(base) else uri
                version = info.get("ETag") or info.get("mtime") or info.get("LastModified")
                files.append(
                    InputFile(
                        uri=uri,
                        format=spec.format,
                        namespace=f"{name}/{relative}",
                        media_root=absolute(spec.media_root) if spec.media_root else _parent(uri),
                        size=int(info["size"]),
                        version=str(version),
                    )
                )
    return files


def _parent(uri: str) -> str:
    return posixpath.dirname(uri) if is_remote(uri) else os.path.dirname(uri)
