"""What every raw-corpus reader provides, and the unit of work they agree on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from infra.storage import Storage
from pipelines.shard.documents import RawDocument


class InputWarning(UserWarning):
    """Something about an input file its user should know that costs no document (a tar
    not in WebDataset order). Readers ``warnings.warn`` it; the shard stage collects
    each one once into its summary."""


@dataclass(frozen=True)
class SplitOptions:
    """How finely inputs are cut; more splits = more parallelism and finer resume."""

    jsonl_split_bytes: int
    parquet_split_rows: int


@dataclass(frozen=True)
class Split:
    """A contiguous piece of one input file: the unit of work, resume and retry.

    ``start``/``end`` are byte offsets (JSONL), row numbers within row group ``part``
    (Parquet), or unused (a whole tar). ``media_root`` is where relative media paths
    resolve; ``namespace`` feeds the stable document ids.
    """

    format: str
    uri: str
    namespace: str
    media_root: str
    part: int = 0
    start: int = 0
    end: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}:{self.part}:{self.start}-{self.end}"

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Split:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


class Reader(Protocol):
    """A raw-corpus format: cut a file into splits, read a split into documents.

    ``scan`` yields the same documents as ``read`` but may leave media bytes out: it
    feeds shard planning, which only counts. A reader whose files are already shards
    (``whole_file_shards``, e.g. WebDataset tars) is not scanned: one file, one shard.
    """

    whole_file_shards: bool

    def splits(
        self, storage: Storage, uri: str, namespace: str, media_root: str, options: SplitOptions
    ) -> list[Split]: ...

    def read(self, storage: Storage, split: Split) -> Iterator[RawDocument]: ...

    def scan(self, storage: Storage, split: Split) -> Iterator[RawDocument]: ...
