"""Endless, exactly resumable per-rank streams of one bucket's token samples.

The sample is the unit of distribution and of resume (open_clip's shard split made exact,
plus the position WebDataset lacks):

1. **order**: every epoch, a bucket's shards are permuted by :func:`shard_order` from
   ``(seed, epoch, bucket)``: the same order on every rank and machine.
2. **split across ranks**: the epoch is that order's ``N`` samples end to end (every
   shard's sample count is known: the tokens manifest's ``samples``, or one pass over the
   tars' headers); rank ``r`` reads the contiguous range ``[r N / world, (r + 1) N /
   world)`` of it (:func:`rank_share`): whole shards in its middle, part of one at each
   end. Ranges partition the epoch, so every sample is read once per epoch across all
   ranks, and every rank reads the same number of samples (within one) whatever the
   shard sizes: ranks that consume at the same rate start their epochs together, and no
   rank's samples come round more often than another's. The counts include samples of
   the other split (skipped where read), so the train samples of two ranks' shares
   differ by how the eval samples happen to fall, about ``sqrt(n f)`` for ``n`` samples a
   share and an eval fraction ``f``.
3. **read**: within a shard, samples come in file order, with no shuffle buffer, so a
   rank's position is three integers (:class:`StreamState`: epoch, place in the rank's
   share, raw samples of that shard consumed) and resume is exact and cheap: the consumed
   samples (and those before the rank's range) are skipped by their tar headers, their
   payloads never read.

The stream never ends (the trainer counts steps). Corrupt input never stops training: a
bad sample or a damaged tar is skipped, counted by reason in ``skipped`` and logged.
Storage errors (a missing shard, a lost connection) do raise.
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
    position: int = 0  # index into this rank's share of the epoch (a list of shard ranges)
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


@dataclass(frozen=True)
class ShardRange:
    """Raw samples ``[start, stop)`` of shard ``url`` (indices within the shard)."""

    url: str
    start: int
    stop: int


def rank_share(
    order: Sequence[str], sizes: Mapping[str, int], rank: int, world: int
) -> list[ShardRange]:
    """Rank ``rank``'s contiguous range of the epoch ``order`` (``sizes``: raw samples per
    shard): ``[rank N / world, (rank + 1) N / world)`` of the ``N`` samples end to end."""
    total = sum(sizes[url] for url in order)
    low, high = rank * total // world, (rank + 1) * total // world
    share, at = [], 0
    for url in order:
        start, stop = max(low, at), min(high, at + sizes[url])
        if start < stop:
            share.append(ShardRange(url, start - at, stop - at))
        at += sizes[url]
    return share


def count_samples(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Samples (runs of members sharing a key) in the tar ``url``, from its headers alone;
    a damaged tar counts the samples before the damage."""
    options = {"storage_options": storage_options} if url.startswith("s3://") else {}
    count, last = 0, None
    with gopen(url, "rb", **options) as stream:
        try:
            with tarfile.TarFile(fileobj=stream) as tar:
                for info in tar:
                    key, _ = base_plus_ext(info.name)
                    if info.isreg() and key is not None and key != last:
                        count, last = count + 1, key
        except tarfile.TarError:
            pass  # not a tar, or damaged: the reader skips and counts it
    return count


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
    ``sizes``: samples per shard (the manifest's ``samples``); None = counted from the
    tars' headers. ``state`` resumes only a stream built with the same shards, sizes,
    seed, rank, world and split.
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
        sizes: Mapping[str, int] | None = None,
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
        if sizes is None:
            sizes = {url: count_samples(url, storage_options) for url in self.shards}
        missing = sorted(set(self.shards) - set(sizes))
        if missing:
            raise ValueError(f"bucket {bucket!r}: no sample count for {missing}")
        self.sizes = {url: int(sizes[url]) for url in self.shards}
        self.skipped: collections.Counter[str] = collections.Counter()
        self._state = state or StreamState()
        share = self._share(self._state.epoch)
        if self._state.position >= max(1, len(share)):
            raise ValueError(
                f"bucket {bucket!r}: state position {self._state.position} is past this "
                f"rank's {len(share)} shard ranges (were the shards or the world size changed?)"
            )
        if share and self._state.offset > share[self._state.position].stop:
            raise ValueError(
                f"bucket {bucket!r}: {self._state} is past this rank's range of its shard "
                f"(were the shards or the world size changed?)"
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

    @property
    def samples_per_epoch(self) -> int:
        """Raw samples (both splits) in the largest share of an epoch: ``ceil(N / world)``."""
        return -(-sum(self.sizes.values()) // self.world)

    def _share(self, epoch: int) -> list[ShardRange]:
        order = shard_order(self.shards, self.seed, epoch, self.bucket)
        return rank_share(order, self.sizes, self.rank, self.world)

    def _generate(self) -> Iterator[TokenSample]:
        epoch, start, skip = self._state.epoch, self._state.position, self._state.offset
        while True:
            whole_epoch, yielded = (start, skip) == (0, 0), False
            for position, part in enumerate(self._share(epoch)[start:], start):
                for index, sample in self._shard(part.url, max(skip, part.start), part.stop):
                    self._state = StreamState(epoch, position, index + 1)
                    yielded = True
                    yield sample
                skip = 0
            if whole_epoch and not yielded:
                raise ValueError(
                    f"bucket {self.bucket!r} gave no {self.split!r} sample to rank {self.rank} "
                    f"of {self.world} in a whole epoch ({epoch}); skipped: {dict(self.skipped)}"
                )
            epoch, start = epoch + 1, 0

    def _shard(self, url: str, skip: int, stop: int) -> Iterator[tuple[int, TokenSample]]:
        """``(raw index, sample)`` for the samples of ``url`` in ``[skip, stop)``.

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
                    if index >= stop:
                        break  # the next rank's samples
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
