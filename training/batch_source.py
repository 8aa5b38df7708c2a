"""Micro-batches in schedule order, read ahead on a background thread.

The bucket of every micro-batch comes from one :class:`BucketSchedule`, the same on every
rank, so all ranks work on the same modality at the same time; each bucket's samples come
from that rank's :class:`BucketStream`. A micro-batch carries the schedule state and its
stream's position *after* it, so a checkpoint records where the consumed batches ended,
however far the reader has run ahead.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenization.token_samples import TokenSample
from training.bucket_schedule import BucketSchedule
from training.generation import padded_length
from training.micro_batch import MicroBatch, collate
from training.token_stream import BucketStream, StreamState


class BucketTooLongError(ValueError):
    """Every sample of a bucket is longer than ``train.max_length``: training cannot go on."""


@dataclass
class SourceSettings:
    """What a rank reads: shards per bucket, its place in the world, batch shape."""

    shards: dict[str, list[str]]
    weights: dict[str, float]
    seed: int
    rank: int
    world: int
    micro_batch_size: int
    pad_id: int
    dgs_block: int | None
    max_length: int
    prefetch: int
    storage_options: dict[str, Any] | None = None
    shard_samples: dict[str, int] | None = None  # samples per shard; None = count them


@dataclass
class SourcePosition:
    """Where the consumed micro-batches ended: the schedule and every bucket's stream."""

    schedule: dict[str, Any]
    streams: dict[str, dict[str, int]]


class BatchSource:
    """Endless iterator of :class:`MicroBatch` (one bucket each) for one rank."""

    def __init__(self, settings: SourceSettings, start: SourcePosition | None = None) -> None:
        self.settings = settings
        self.schedule = BucketSchedule(settings.weights)
        states = start.streams if start else {}
        if start is not None:
            self.schedule.load_state_dict(start.schedule)
        self.streams = {
            bucket: BucketStream(
                bucket,
                settings.shards[bucket],
                seed=settings.seed,
                rank=settings.rank,
                world=settings.world,
                sizes=settings.shard_samples,
                state=StreamState.from_dict(states[bucket]) if bucket in states else None,
                storage_options=settings.storage_options,
            )
            for bucket in settings.weights
        }
        self.position = SourcePosition(
            self.schedule.state_dict(), {b: s.state.to_dict() for b, s in self.streams.items()}
        )
        self.too_long: Counter[str] = Counter()
        self._queue: queue.Queue[tuple[MicroBatch, dict[str, Any]] | BaseException] = queue.Queue(
            maxsize=settings.prefetch
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="batch-source", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._read_one()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # handed to the training loop, which re-raises it
            self._queue.put(error)

    def _read_one(self) -> tuple[MicroBatch, dict[str, Any]]:
        s = self.settings
        bucket = self.schedule.next()
        schedule_state = self.schedule.state_dict()
        stream = self.streams[bucket]
        samples, in_a_row = [], 0
        while len(samples) < s.micro_batch_size:
            sample = next(stream)
            if self._length(sample) > s.max_length:
                self.too_long[bucket] += 1
                in_a_row += 1
                # Twice a share's samples in a row hold one whole share of an epoch.
                if in_a_row >= 2 * stream.samples_per_epoch:
                    raise BucketTooLongError(
                        f"bucket {bucket!r}: no sample fits train.max_length={s.max_length} "
                        f"(the last {in_a_row} on rank {s.rank}, a whole epoch's share, were "
                        "all longer, DGS padding included): raise train.max_length or leave "
                        "the bucket out of train.bucket_weights"
                    )
                continue
            in_a_row = 0
            samples.append(sample)
        batch = collate(samples, bucket, s.pad_id, s.dgs_block, stream.state.to_dict())
        return batch, schedule_state

    def _length(self, sample: TokenSample) -> int:
        """Positions the sample takes in a micro-batch, DGS padding included."""
        length, block = int(sample.tokens.shape[0]), self.settings.dgs_block
        if block is None:
            return length
        instruction = int(sample.meta["instruction_length"])
        return instruction + padded_length(length - instruction, block)

    def __iter__(self) -> BatchSource:
        return self

    def __next__(self) -> MicroBatch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, schedule_state = item
        self.position.schedule = schedule_state
        self.position.streams[batch.bucket] = batch.stream_state
        return batch

    def skipped(self) -> Mapping[str, int]:
        """Corrupt members and tars skipped, and over-long samples, by reason."""
        counts: Counter[str] = Counter()
        for stream in self.streams.values():
            counts.update(stream.skipped)
        counts.update({f"too_long_{b}": n for b, n in self.too_long.items()})
        return counts

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
