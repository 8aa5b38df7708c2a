"""The token-sample codec: :class:`TokenSequence` <-> WebDataset tar shards.

One sample per (document, bucket), readable by plain ``webdataset.WebDataset(...)``:

    KEY.meta.json      caller's meta (document id, source, ...) + bucket, instruction_length,
                       spans [[kind, start, end], ...], length
    KEY.modality.npy   (L,) uint8 modality codes
    KEY.tokens.npy     (L,) int32 unified ids

``KEY`` is ``<document id>-<bucket>``: no dots (WebDataset splits member names at the first
dot) and no slashes. Tars are deterministic: the same samples give byte-identical tars, so a
shard's sha256 is stable across runs and machines. Reading never unpickles: ``.npy`` members
are decoded with ``np.load(allow_pickle=False)``.

Importing this module registers an ``s3://`` opener in ``webdataset.gopen.gopen_schemes``
(webdataset has none), so plain ``WebDataset("s3://...")`` works too, configured from the
AWS environment variables; :func:`read_token_samples` passes explicit ``storage_options``.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch
from fsspec.core import url_to_fs
from webdataset.gopen import gopen, gopen_schemes
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.writer import TarWriter

from tokenization.sequences import TokenSequence

MEMBERS = ("meta.json", "modality.npy", "tokens.npy")
_RESERVED_META = ("bucket", "instruction_length", "spans", "length")
TAR_MTIME = 0  # fixed member mtime, owner and mode: tars depend on their samples only
TAR_OWNER = "omni"
TAR_MODE = 0o644


def split_of(document_id: str, eval_fraction: float) -> str:
    """``"train"`` or ``"eval"``, from the sha1 of the id: the same on every run and machine.

    Same hash as the tokenizer stage's held-out split, so with equal fractions the documents
    held out there are exactly the eval documents here.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must lie in [0, 1], got {eval_fraction}")
    position = int(hashlib.sha1(document_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if position < eval_fraction else "train"


def declared_split(document_id: str, metadata: Mapping[str, Any], eval_fraction: float) -> str:
    """The split a document declares in its metadata (``"split"``: ``"train"`` or
    ``"eval"``), else :func:`split_of` its id.

    A corpus whose eval set must follow its own rule (held-out voices, a benchmark's test
    images) declares it per document; any other value falls back to the hash.
    """
    declared = metadata.get("split")
    return declared if declared in ("train", "eval") else split_of(document_id, eval_fraction)


def _check_key(key: str) -> str:
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key must be non-empty, without dots or slashes: {key!r}")
    return key


def sample_key(document_id: str, bucket: str) -> str:
    """``<document_id>-<bucket>``; ValueError if either part holds a dot or a slash."""
    return _check_key(f"{document_id}-{bucket}")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_sample(key: str, sequence: TokenSequence, meta: dict[str, Any]) -> dict[str, bytes]:
    """One sample's tar members: ``{"__key__", "meta.json", "modality.npy", "tokens.npy"}``.

    ``meta`` must be JSON-serialisable and may not use the keys this codec writes.
    """
    _check_key(key)
    tokens = np.asarray(sequence.tokens)
    modality = np.asarray(sequence.modality)
    if tokens.ndim != 1 or tokens.shape != modality.shape:
        raise ValueError(f"tokens {tokens.shape} and modality {modality.shape} must be (L,)")
    clash = sorted(set(meta) & set(_RESERVED_META))
    if clash:
        raise ValueError(f"meta may not set {clash}: the codec writes them")
    full_meta = {
        **meta,
        "bucket": sequence.bucket,
        "instruction_length": int(sequence.instruction_length),
        "spans": [[span.kind, int(span.start), int(span.end)] for span in sequence.spans],
        "length": int(tokens.shape[0]),
    }
    return {
        "__key__": key,
        "meta.json": json.dumps(full_meta, sort_keys=True).encode("utf-8"),
        "modality.npy": _npy(modality.astype(np.uint8)),
        "tokens.npy": _npy(tokens.astype(np.int32)),
    }


def write_tar(samples: list[dict[str, bytes]], sort: bool = True) -> bytes:
    """A WebDataset tar of ``samples`` in memory, byte-identical for the same samples.

    Samples are sorted by key unless ``sort`` is False (then in the caller's order, which
    must itself be deterministic: pretokenize stages a bucket's samples split by split, and
    packing cuts them by that order). Duplicates are refused; members of a sample are in
    name order (TarWriter does that); TarWriter takes a fixed mtime, owner and mode, and
    uid/gid stay 0. PAX format, so long keys are allowed (USTAR stops at 100-character names).
    """
    keys = [_check_key(sample["__key__"]) for sample in samples]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate sample keys")
    buffer = io.BytesIO()
    with TarWriter(
        buffer,
        user=TAR_OWNER,
        group=TAR_OWNER,
        mode=TAR_MODE,
        encoder=False,
        mtime=TAR_MTIME,
        format="PAX_FORMAT",
    ) as writer:
        for sample in sorted(samples, key=lambda s: s["__key__"]) if sort else samples:
            writer.write(sample)
    return buffer.getvalue()


def read_tar(data: bytes) -> list[dict[str, bytes]]:
    """The samples of an in-memory tar as :func:`write_tar` takes them (``__key__`` and
    member bytes), in file order: its inverse, through webdataset's own tar reader."""
    files = tar_file_expander([{"url": "memory", "stream": io.BytesIO(data)}])
    return [
        {
            name: value
            for name, value in raw.items()
            if name == "__key__" or not name.startswith("__")
        }
        for raw in group_by_keys(files)
    ]


@dataclass
class TokenSample:
    """One decoded sample: ``tokens`` (L,) int64, ``modality`` (L,) uint8, its meta."""

    key: str
    tokens: torch.Tensor
    modality: torch.Tensor
    meta: dict[str, Any]


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """webdataset opener for ``s3://`` through s3fs (its own block size, not ``bufsize``).

    ``storage_options`` in ``kw`` go to s3fs; without them s3fs reads the AWS environment.
    """
    fs, path = url_to_fs(url, **(kw.get("storage_options") or {}))
    return fs.open(path, mode)


gopen_schemes["s3"] = _gopen_s3


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _decode(raw: dict[str, Any]) -> TokenSample:
    key = raw["__key__"]
    missing = [name for name in MEMBERS if name not in raw]
    if missing:
        raise ValueError(f"sample {key!r} in {raw.get('__url__')} lacks {missing}")
    tokens = _load_npy(raw["tokens.npy"])
    modality = _load_npy(raw["modality.npy"])
    if tokens.ndim != 1 or tokens.shape != modality.shape:
        raise ValueError(f"sample {key!r}: tokens {tokens.shape} vs modality {modality.shape}")
    return TokenSample(
        key=key,
        tokens=torch.from_numpy(tokens.astype(np.int64)),
        modality=torch.from_numpy(modality.astype(np.uint8)),
        meta=json.loads(raw["meta.json"]),
    )


def read_token_samples(
    urls: str | list[str], storage_options: dict[str, Any] | None = None
) -> Iterator[TokenSample]:
    """Every sample of the tars at ``urls`` (paths or ``s3://``; brace ranges) in file order.

    Built from webdataset's own tar expander and key grouper rather than ``WebDataset``:
    its node splitter raises under ``torch.distributed`` with several ranks and its worker
    splitter would drop shards inside a DataLoader worker; sharding is the caller's job.
    ``storage_options`` (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``) go to s3fs.
    """
    for url in expand_urls(urls) if isinstance(urls, str) else list(urls):
        options = {"storage_options": storage_options} if url.startswith("s3://") else {}
        with gopen(url, "rb", **options) as stream:
            files = tar_file_expander([{"url": url, "stream": stream}])
            for raw in group_by_keys(files):
                yield _decode(raw)
