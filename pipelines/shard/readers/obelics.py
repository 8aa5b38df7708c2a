"""OBELICS-style Parquet: ``id``, ``texts: list<string>``, ``images: list<binary>``.

The two lists are aligned by position; at each position exactly one of them is non-null.
Other columns are kept as metadata. A file is cut by row group, and large row groups
into row ranges.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from infra.storage import Storage
from pipelines.shard.documents import RawDocument, Rejected
from pipelines.shard.readers.base import Split, SplitOptions

REQUIRED_COLUMNS = ("texts", "images")


class ObelicsReader:
    format = "obelics"
    whole_file_shards = False

    def splits(
        self, storage: Storage, uri: str, namespace: str, media_root: str, options: SplitOptions
    ) -> list[Split]:
        with storage.open(uri, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            metadata = parquet.metadata
            names = set(parquet.schema_arrow.names)
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                raise ValueError(f"{uri}: not an OBELICS file, missing column(s) {missing}")
            sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        step = options.parquet_split_rows
        return [
            Split(
                self.format,
                uri,
                namespace,
                media_root,
                part=group,
                start=s,
                end=min(s + step, rows),
            )
            for group, rows in enumerate(sizes)
            for s in range(0, rows, step)
        ]

    def read(self, storage: Storage, split: Split) -> Iterator[RawDocument]:
        yield from self._rows(storage, split, with_images=True)

    def scan(self, storage: Storage, split: Split) -> Iterator[RawDocument]:
        """Everything but the image bytes: image positions are where ``texts`` is null."""
        yield from self._rows(storage, split, with_images=False)

    def _rows(self, storage: Storage, split: Split, with_images: bool) -> Iterator[RawDocument]:
        with storage.open(split.uri, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            columns = None if with_images else ["id", "texts"]
            if columns is not None:
                columns = [c for c in columns if c in parquet.schema_arrow.names]
            first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(split.part))
            table = parquet.read_row_group(split.part, columns=columns)
        table = table.slice(split.start, split.end - split.start)
        for index, row in enumerate(table.to_pylist()):
            if not with_images:
                row["images"] = [b"" if text is None else None for text in row["texts"] or []]
            yield self._document(row, first_row + split.start + index, split)

    def _document(self, row: dict[str, Any], row_number: int, split: Split) -> RawDocument:
        native_id = row.pop("id", None)
        texts = row.pop("texts", None) or []
        images = row.pop("images", None) or []
        document = RawDocument(
            str(native_id) if native_id is not None else f"#row={row_number}",
            f"{split.uri}#row={row_number}",
            split.namespace,
            metadata={key: _jsonable(value) for key, value in row.items()},
        )
        if len(texts) != len(images):
            document.rejection = Rejected(
                "misaligned_row", f"texts has {len(texts)} entries, images has {len(images)}"
            )
            return document
        for position, (text, image) in enumerate(zip(texts, images, strict=True)):
            if (text is None) == (image is None):
                document.rejection = Rejected(
                    "misaligned_row",
                    f"position {position} must hold exactly one of a text and an image",
                )
                return document
            if text is not None:
                document.segments.append({"type": "text", "text": text})
            else:
                document.segments.append({"type": "image", "bytes": image, "ext": ""})
        return document


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value
