"""Endless, exactly resumable per-rank streams of one bucket's token samples.

The shard is the unit of distribution and the sample the unit of resume (open_clip's shard
split, plus the exact position WebDataset lacks):

1. **order**: every epoch, a bucket's shards are permuted by :func:`shard_order` from
   ``(seed, epoch, bucket)``: the same order on every rank and machine.
2. **split across ranks**: with at least as many shards as ranks, rank ``r`` reads
   ``order[r::world]``, so no shard is read by two ranks. With fewer shards than ranks,
   every rank reads every shard in that order and keeps the samples of the wanted split
   whose running index in the epoch (counting that split only) is ``≡ r (mod world)``:
   still no overlap, and no rank starves.
3. **read**: within a shard, samples come in file order, with no shuffle buffer, so a
   rank's position is three integers (:class:`StreamState`: epoch, shard position, raw
   samples consumed) and resume is exact and cheap: the consumed samples are skipped by
   their tar headers, their payloads never read.

An epoch is one pass of one rank over its shards; ranks' epochs need not line up (shard
sizes differ), which is why the stream never ends and the trainer counts steps. Corrupt
input never stops training: a bad sample or a damaged tar is skipped, counted by reason in
``skipped`` and logged. Storage errors (a missing shard, a lost connection) do raise.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from tokenization.token_samples import MEMBERS, TokenSample, _decode

logger = logging.getLogger(__name__)


@dataclass
class StreamState:
    """Where one rank's stream of one bucket resumes: just after the last sample returned."""

    epoch: int = 0  # epochs of this bucket completed by this rank's stream
    position: int = 0  # index into this rank's shard order of the epoch
    offset: int = 0  # raw samples of that shard already consumed (all splits counted)

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"StreamState.{item.name} must be an int >= 0, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        """``{"epoch", "position", "offset"}``: plain JSON for checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, int]) -> StreamState:
        """The state :meth:`to_dict` saved; ValueError on missing or unknown keys."""
        names = {item.name for item in fields(cls)}
        if set(data) != names:
            raise ValueError(f"StreamState needs exactly {sorted(names)}, got {sorted(data)}")
        return cls(**data)


def shard_order(shards: Sequence[str], seed: int, epoch: int, bucket: str) -> list[str]:
    """Deterministic permutation of the sorted ``shards`` from ``(seed, epoch, bucket)``.

    The same on every rank and machine: numpy's PCG64 seeded from a sha256 of the three
    (never Python's salted ``hash()``). Only the shards' sorted order matters, so paths that
    differ by a common prefix (local or ``s3://`` workspace) give the same permutation.
    """
    ordered = sorted(shards)
    digest = hashlib.sha256(json.dumps([seed, epoch, bucket]).encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:16], "little"))
    return [ordered[i] for i in rng.permutation(len(ordered))]


@dataclass
class _RawSample:
    """Consecutive tar members sharing a key (WebDataset's grouping); payloads unread."""

    key: str
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    duplicate: str | None = None  # a member suffix seen twice


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    """One member's bytes; ``tarfile.ReadError`` when the tar ends inside them."""
    return tar.extractfile(info).read()  # type: ignore[union-attr]  # regular members only


def _ends_cleanly(tar: tarfile.TarFile) -> bool:
    """Whether the header read that stopped iteration was the end-of-archive zero block.

    ``tarfile`` stops silently at a truncated or invalid header after the first one;
    ``TarFile.offset`` is where that header was read.
    """
    tar.fileobj.seek(tar.offset)
    return tar.fileobj.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE


class BucketStream:
    """Endless, resumable stream of one bucket's samples (one split) for one rank.

    ``shards``: every tar of the bucket (local paths or ``s3://`` URLs, e.g. the tokens
    manifest's ``path`` joined to the tokens directory), the same list on every rank.
    ``state`` resumes only a stream built with the same shards, seed, rank, world and split.
    ``storage_options`` go to s3fs for ``s3://`` shards. ``skipped`` counts what was
    dropped, by reason: ``corrupt_tar`` (not a tar), ``truncated_tar`` (ends before its
    end-of-archive block; the samples before the damage are read), ``truncated_member``,
    ``missing_member``, ``duplicate_member``, ``bad_meta``, ``bad_npy``; each is logged
    every time it is read.
    """

    def __init__(
        self,
        bucket: str,
        shards: Sequence[str],
        *,
        seed: int,
        rank: int,
        world: int,
        split: str = "train",
        state: StreamState | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if not shards:
            raise ValueError(f"bucket {bucket!r} has no shards")
        if len(set(shards)) != len(shards):
            raise ValueError(f"bucket {bucket!r}: duplicate shards")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank {rank}, world {world}")
        self.bucket, self.seed, self.rank, self.world, self.split = bucket, seed, rank, world, split
        self.shards = tuple(sorted(shards))
        self.storage_options = storage_options
        self.skipped: collections.Counter[str] = collections.Counter()
        self._every_rank_reads_all = len(self.shards) < world
        self._state = state or StreamState()
        self._counter = self._resumed_counter()
        per_rank = len(self._rank_order(0))
        if self._state.position >= per_rank:
            raise ValueError(
                f"bucket {bucket!r}: state position {self._state.position} is past this "
                f"rank's {per_rank} shards (were the shards or the world size changed?)"
            )
        self._samples = self._generate()

    def __iter__(self) -> Iterator[TokenSample]:
        return self

    def __next__(self) -> TokenSample:
        return next(self._samples)

    @property
    def state(self) -> StreamState:
        """The position just after the last sample returned: pass it back to resume."""
        return StreamState(**self._state.to_dict())

    def _resumed_counter(self) -> int:
        """The epoch's running index (mod world) at the state, when every rank reads all.

        A state is taken just after a sample this rank kept, whose index is ``≡ rank``; an
        untouched shard 0 is the epoch's start. Any other state was not made by a stream.
        """
        state = self._state
        if not self._every_rank_reads_all or (state.position, state.offset) == (0, 0):
            return 0
        if state.offset == 0:
            raise ValueError(f"{state} was not produced by a BucketStream with these shards")
        return (self.rank + 1) % self.world

    def _rank_order(self, epoch: int) -> list[str]:
        order = shard_order(self.shards, self.seed, epoch, self.bucket)
        return order if self._every_rank_reads_all else order[self.rank :: self.world]

    def _generate(self) -> Iterator[TokenSample]:
        epoch, start, skip = self._state.epoch, self._state.position, self._state.offset
        while True:
            whole_epoch, yielded = (start, skip) == (0, 0), False
            for position, url in enumerate(self._rank_order(epoch)[start:], start):
                for index, sample in self._shard(url, skip):
                    self._state = StreamState(epoch, position, index + 1)
                    yielded = True
                    yield sample
                skip = 0
            if whole_epoch and not yielded:
                raise ValueError(
                    f"bucket {self.bucket!r} gave no {self.split!r} sample to rank {self.rank} "
                    f"of {self.world} in a whole epoch ({epoch}); skipped: {dict(self.skipped)}"
                )
            epoch, start, self._counter = epoch + 1, 0, 0

    def _shard(self, url: str, skip: int) -> Iterator[tuple[int, TokenSample]]:
        """``(raw index, sample)`` for this rank's samples of ``url`` after the first ``skip``.

        tarfile in random-access mode rather than webdataset's streaming expander: skipped
        samples cost a header read each (their payloads are seeked over, resume is cheap),
        and a damaged tar is told apart from a complete one by its end-of-archive block.
        """
        options = {"storage_options": self.storage_options} if url.startswith("s3://") else {}
        with gopen(url, "rb", **options) as stream:
            try:
                tar = tarfile.TarFile(fileobj=stream)  # uncompressed, random access
            except tarfile.TarError as error:
                self._skip("corrupt_tar", url, None, str(error))
                return
            with tar:
                for index, raw in enumerate(self._groups(tar, url)):
                    if index >= skip:
                        sample = self._take(tar, url, raw)
                        if sample is not None:
                            yield index, sample

    def _groups(self, tar: tarfile.TarFile, url: str) -> Iterator[_RawSample]:
        """Members grouped by key from their headers; a damaged tar ends after its last group."""
        current: _RawSample | None = None
        damage = None
        try:
            for info in tar:
                key, suffix = base_plus_ext(info.name)
                if not info.isreg() or key is None:
                    continue
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = _RawSample(key)
                suffix = suffix.lower()
                if suffix in current.members:
                    current.duplicate = suffix
                current.members[suffix] = info
            if not _ends_cleanly(tar):
                damage = f"no end-of-archive block at byte {tar.offset}"
        except tarfile.ReadError as error:
            damage = str(error)
        if current is not None:
            yield current
        if damage is not None:
            self._skip("truncated_tar", url, None, damage)

    def _take(self, tar: tarfile.TarFile, url: str, raw: _RawSample) -> TokenSample | None:
        """The decoded sample if it is this rank's, of the wanted split, and sound."""
        if raw.duplicate is not None:
            return self._skip("duplicate_member", url, raw.key, f"two {raw.duplicate} members")
        if "meta.json" not in raw.members:
            return self._skip("missing_member", url, raw.key, "no meta.json")
        try:
            meta_bytes = _read(tar, raw.members["meta.json"])
            meta = json.loads(meta_bytes)
        except tarfile.ReadError as error:
            return self._skip("truncated_member", url, raw.key, str(error))
        except ValueError as error:  # JSON and UTF-8 errors
            return self._skip("bad_meta", url, raw.key, str(error))
        if not isinstance(meta, dict) or "split" not in meta:
            return self._skip("bad_meta", url, raw.key, "not an object with a 'split'")
        if meta["split"] != self.split:
            return None
        if self._every_rank_reads_all:
            turn, self._counter = self._counter, (self._counter + 1) % self.world
            if turn != self.rank:
                return None
        missing = [name for name in MEMBERS if name not in raw.members]
        if missing:
            return self._skip("missing_member", url, raw.key, f"no {', '.join(missing)}")
        try:
            arrays = {
                name: _read(tar, raw.members[name]) for name in MEMBERS if name != "meta.json"
            }
        except tarfile.ReadError as error:
            return self._skip("truncated_member", url, raw.key, str(error))
        try:
            return _decode({"__key__": raw.key, "__url__": url, "meta.json": meta_bytes, **arrays})
        except Exception as error:  # numpy's npy parser raises several types on bad bytes
            return self._skip("bad_npy", url, raw.key, f"{type(error).__name__}: {error}")

    def _skip(self, reason: str, url: str, key: str | None, detail: str) -> None:
        self.skipped[reason] += 1
        where = f"sample {key!r}" if key is not None else "the rest of the tar"
        logger.warning(
            "bucket %s: skipped %s of %s (%s): %s", self.bucket, where, url, reason, detail
        )
