"""Token tars of a useful size: each bucket's samples packed across input shards.

``omni pretokenize`` works in two phases. First its actors tokenize input shards and
stage, per shard and bucket, one tar ``tokens/_staged/<bucket>/<shard>.tar``, the shard's
marker written last (``pipelines.pretokenize.worker``). A shard holds a few hundred
documents and a rare bucket a handful of their samples: published as they are, those
would make hundreds of thousands of tiny objects on S3 at scale (listing, per-object
latency, a shard shuffle that shuffles little). So, once every shard is done, each
bucket's samples are packed: a plan (:func:`packing_plan`) cuts them, in (shard, key)
order, into runs of ``pretokenize.samples_per_tar``, and one Ray task per output tar
(:func:`pack_tar`) copies its run into ``tokens/<bucket>/NNNNNN.tar``, then writes the
tar's marker.

Exactly once, resumable: the plan is a function of the shards' markers alone, so every
sample has one place and a rerun after a kill plans the same tars; a tar is published
atomically under its name before its marker, and a tar with a marker is not packed
again. Resume is by input shard in the first phase and by output tar in the second.
The staging costs one more write and read of the token data, which is small next to
the media it came from.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Any

from infra.storage import join
from pipelines.pretokenize.settings import WorkerSettings
from tokenization.token_samples import read_tar, write_tar

PACKED = "_packed"


def packing_plan(staged: list[dict[str, Any]], samples_per_tar: int) -> list[dict[str, Any]]:
    """The output tars of every bucket from the staged tars ``[{"bucket", "path",
    "samples", "splits"}]``: per bucket and split, its samples in (staged path, key) order
    cut into runs of ``samples_per_tar`` (the last one shorter). Each row names the output
    ``path`` (``<bucket>/<split>-NNNNNN.tar``), its ``split`` and the ``slices``
    ``[staged path, start, stop]`` it copies, in order.

    One split per tar lets each rank take an equal share of the train split (and the
    evaluation read only eval tars): a rank's contiguous range of a mixed run could hold
    no train sample at all. A staged tar holds its splits in name order, one run each
    (``pipelines.pretokenize.worker``); one from before splits were recorded
    (no ``splits``) is packed as before, into mixed ``<bucket>/NNNNNN.tar``.
    """
    by_run: dict[tuple[str, str | None], list[tuple[str, int, int]]] = defaultdict(list)
    for entry in sorted(staged, key=lambda e: e["path"]):
        splits = entry.get("splits")
        if splits is None:
            by_run[(entry["bucket"], None)].append((entry["path"], 0, entry["samples"]))
            continue
        if sum(splits.values()) != entry["samples"]:
            raise ValueError(f"{entry['path']}: split counts {splits} != {entry['samples']}")
        offset = 0
        for split in sorted(splits):
            if splits[split]:
                by_run[(entry["bucket"], split)].append(
                    (entry["path"], offset, offset + splits[split])
                )
            offset += splits[split]
    rows = []
    for (bucket, split), pieces in sorted(
        by_run.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
    ):
        runs: list[list[list[Any]]] = [[]]
        filled = 0
        for path, start, stop in pieces:
            while start < stop:
                if filled == samples_per_tar:
                    runs.append([])
                    filled = 0
                take = min(samples_per_tar - filled, stop - start)
                runs[-1].append([path, start, start + take])
                start, filled = start + take, filled + take
        prefix = f"{split}-" if split is not None else ""
        for index, slices in enumerate(runs):
            path = f"{bucket}/{prefix}{index:06d}.tar"
            rows.append(
                {"name": path, "bucket": bucket, "split": split, "path": path, "slices": slices}
            )
    return rows


def pack_marker(tokens_dir: str, path: str) -> str:
    return join(tokens_dir, PACKED, path.replace(".tar", ".json"))


def pack_tar(row: dict[str, Any], settings: WorkerSettings) -> dict[str, Any]:
    """Write one output tar of the plan (idempotent through its marker); its manifest
    row: bucket, split (None: both), path, samples, tokens, bytes, sha256."""
    storage, tokens_dir = settings.storage, settings.tokens_dir
    marker = pack_marker(tokens_dir, row["path"])
    if storage.exists(marker):
        return json.loads(storage.read_bytes(marker))
    samples = []
    for path, start, stop in row["slices"]:
        samples += read_tar(storage.read_bytes(join(tokens_dir, path)))[start:stop]
    data = write_tar(samples)
    storage.write_bytes(join(tokens_dir, row["path"]), data)
    entry = {
        "bucket": row["bucket"],
        "split": row.get("split"),
        "path": row["path"],
        "samples": len(samples),
        "tokens": sum(int(json.loads(s["meta.json"])["length"]) for s in samples),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    storage.write_bytes(marker, json.dumps(entry).encode())
    return entry
