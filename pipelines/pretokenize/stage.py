"""``omni pretokenize``: shards -> WebDataset token shards per bucket, exactly once.

A pool of Ray actors, each loading the tokenizers once, takes input shards one at a time
(``pipelines.pretokenize.worker``). An actor asks for ``pretokenize.num_gpus`` GPUs when
the cluster has any, CPUs otherwise; it encodes on CUDA when it got a GPU.

An actor pool rather than Ray Data ``map_batches`` with an actor class: the unit
is a whole input shard whose outputs (tars, a marker) the actor publishes itself, so there
is no block stream to return; one task per shard keeps resume and retry at shard
granularity, and Ray Data's streaming executor measured slower on units of this shape
(see ``pipelines/ray_units.py``). An actor whose process dies is restarted (tokenizers
reloaded) and its task retried by Ray; shards are idempotent, so nothing is duplicated.

The actors stage each shard's samples per bucket; once every shard is done, one Ray task
per output tar packs each bucket's samples across shards into tars of
``samples_per_tar`` (``pipelines.pretokenize.packing``), so a tar is a useful size however
small the input shards are.

When a shard kills its actor on every retry, a medium in it crashes a decoder natively
(a segfault in a C library cannot be caught in Python). The actor is replaced, each of
the shard's documents is tokenized alone in a throwaway Ray task, the documents whose
task dies are quarantined (``decoder_crashed``), and the shard is processed once more
without them: one bad medium never fails its shard.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray
import torch
from ray.exceptions import RayActorError, WorkerCrashedError
from tqdm import tqdm

from infra.config import fingerprint
from infra.ray_runtime import connect, disconnect
from infra.storage import Storage, join
from pipelines.corpus import absolute
from pipelines.pretokenize.packing import PACKED, pack_tar, packing_plan
from pipelines.pretokenize.settings import WorkerSettings
from pipelines.pretokenize.worker import (
    STAGE,
    STAGED,
    marker_uri,
    process_shard,
    read_documents,
    tokenize_documents,
)
from pipelines.ray_units import run_units
from pipelines.stage_state import (
    RUNNING,
    SUCCESS,
    begin_stage,
    parquet_bytes,
    quarantine_table,
    read_marker,
    read_parquet,
    success_payload,
    write_marker,
)
from tokenization.bundle import Tokenizers

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig

MANIFEST_SCHEMA = pa.schema(
    [
        ("bucket", pa.string()),
        ("split", pa.string()),  # "train" or "eval"; null: a tar of both (older workspaces)
        ("path", pa.string()),
        ("samples", pa.int64()),
        ("tokens", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
    ]
)


@dataclass
class PretokenizeReport:
    """Per-bucket counts and what was quarantined."""

    stage_dir: str
    skipped: bool
    documents: int = 0
    buckets: dict[str, dict[str, int]] = field(default_factory=dict)
    tars: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    resumed_shards: int = 0
    actors: int = 0
    devices: list[str] = field(default_factory=list)
    gpu_ids: list[str] = field(default_factory=list)  # GPUs Ray assigned to the actors
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@ray.remote
class PretokenizeActor:
    """Holds the tokenizers; tokenizes one input shard per call."""

    def __init__(self, tokenizers_uri: str, settings: WorkerSettings, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        self.device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
        self.gpus = list(gpus)
        self.tokenizers = Tokenizers.load_uri(settings.storage, tokenizers_uri, self.device)
        self.settings = settings

    def process(self, part: str, crashed: Mapping[str, str] | None = None) -> dict[str, Any]:
        result = process_shard(part, self.tokenizers, self.settings, crashed)
        return {**result, "device": self.device, "gpus": self.gpus}


@ray.remote(max_retries=0)
def _tokenize_alone(tokenizers_uri: str, settings: WorkerSettings, document: dict) -> None:
    """Tokenize one document in a worker of its own; its death names a crashing medium."""
    torch.set_num_threads(1)
    tokenize_documents([document], Tokenizers.load_uri(settings.storage, tokenizers_uri), settings)


def _crashing_documents(
    part: str, settings: WorkerSettings, tokenizers_uri: str, resources: dict[str, float]
) -> dict[str, str]:
    """Document id -> reason, for each document of ``part`` whose worker dies tokenizing it.

    One task per document, all at once, rather than the shard stage's bisection: the
    documents are in hand with their media, and a worker that dies costs seconds of imports
    to replace, so log2(n) sequential rounds of crashes would cost more than n small tasks.
    """
    documents = read_documents(part, settings)
    tasks = {
        _tokenize_alone.options(**resources).remote(tokenizers_uri, settings, d): d["id"]
        for d in documents
    }
    crashed = {}
    for task, document_id in tasks.items():
        try:
            ray.get(task)
        except WorkerCrashedError as error:
            crashed[document_id] = f"the worker process died tokenizing it: {error}"[:500]
    return crashed


def _settings(config: PipelineConfig, storage: Storage, workspace: str) -> WorkerSettings:
    section = config.pretokenize
    return WorkerSettings(
        storage=storage,
        shards_dir=join(workspace, "shards"),
        tokens_dir=join(workspace, "tokens"),
        image_batch=section.image_batch,
        audio_batch=section.audio_batch,
        samples_per_tar=section.samples_per_tar,
        eval_fraction=section.eval_fraction,
        sequences=section.sequences,
    )


def _run_pool(
    config: PipelineConfig, settings: WorkerSettings, parts: list[str]
) -> tuple[list[dict[str, Any]], int]:
    """Tokenize ``parts`` on a pool of actors, one shard per call, largest first.

    Written out rather than ``ray.util.ActorPool``: a shard that keeps killing its actor
    must not end the stage, so the loop replaces dead actors and re-queues the shard with
    its crashing documents found (``_crashing_documents``). Returns (results, pool size).
    """
    section = config.pretokenize
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    resources = {
        "num_cpus": section.cpus_per_actor,
        "num_gpus": section.num_gpus if has_gpus else 0,
    }
    options = {
        **resources,
        "max_restarts": section.max_restarts,
        "max_task_retries": section.max_restarts,
    }
    threads = int(section.cpus_per_actor)
    tokenizers_uri = join(absolute(config.workspace), "tokenizers")

    def start_actor() -> Any:
        return PretokenizeActor.options(**options).remote(tokenizers_uri, settings, threads)

    size = max(1, min(section.actors, len(parts)))
    idle = [start_actor() for _ in range(size)]
    queue, running = deque(parts), {}
    crashed: dict[str, dict[str, str]] = {}
    results, totals = [], Counter()
    with tqdm(total=len(parts), desc="pretokenize", unit="shard", dynamic_ncols=True) as bar:
        while queue or running:
            while idle and queue:
                actor, part = idle.pop(), queue.popleft()
                running[actor.process.remote(part, crashed.get(part))] = (actor, part)
            [ready], _ = ray.wait(list(running), num_returns=1)
            actor, part = running.pop(ready)
            try:
                result = ray.get(ready)
            except RayActorError as error:  # died on every retry Ray gave the task
                ray.kill(actor)
                if part in crashed:
                    raise RuntimeError(
                        f"shard {part} killed its actor again with {sorted(crashed[part])} "
                        f"quarantined; no single document reproduces it: {error}"
                    ) from error
                message = f"{part}: its actor died on every retry; isolating the document"
                bar.write(message, sys.stderr)
                crashed[part] = _crashing_documents(part, settings, tokenizers_uri, resources)
                queue.appendleft(part)
                idle.append(start_actor())
                continue
            idle.append(actor)
            results.append(result)
            totals["samples"] += sum(t["samples"] for t in result["staged"])
            totals["quarantined"] += len(result["quarantine"])
            bar.set_postfix(samples=totals["samples"], quarantined=totals["quarantined"])
            bar.update(1)
    for actor in idle:
        ray.kill(actor)
    return results, size


def _pack(
    config: PipelineConfig, settings: WorkerSettings, results: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Pack every bucket's staged samples into tars of ``samples_per_tar``; their rows."""
    staged = [entry for result in results for entry in result["staged"]]
    rows = packing_plan(staged, settings.samples_per_tar)
    return run_units(
        pack_tar,
        rows,
        {"settings": settings},
        config.pretokenize.pack_cpus,
        "pack",
        retries=config.pretokenize.max_restarts,
    )


def _finish(
    storage: Storage, stage_dir: str, results: list[dict[str, Any]], packed: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], Counter[str], int]:
    """Write manifest.parquet, quarantine.parquet and stats.json from the shard results
    and the packed tars."""
    ordered = sorted(results, key=lambda r: r["part"])
    tars = sorted(packed, key=lambda t: (t["bucket"], t["path"]))
    manifest = pa.Table.from_pylist(tars, schema=MANIFEST_SCHEMA)
    storage.write_bytes(join(stage_dir, "manifest.parquet"), parquet_bytes(manifest))
    rows = [row for r in ordered for row in r["quarantine"]]
    storage.write_bytes(
        join(stage_dir, "quarantine.parquet"), parquet_bytes(quarantine_table(rows))
    )
    buckets: dict[str, dict[str, Any]] = {}
    for result in ordered:
        for bucket, stats in result["stats"].items():
            entry = buckets.setdefault(bucket, {"samples": 0, "tokens": 0, "histogram": Counter()})
            entry["samples"] += stats["samples"]
            entry["tokens"] += stats["tokens"]
            entry["histogram"].update(stats["histogram"])
    stats = {name: {**b, "histogram": dict(b["histogram"])} for name, b in sorted(buckets.items())}
    storage.write_bytes(join(stage_dir, "stats.json"), json.dumps(stats, indent=2).encode())
    return stats, Counter(row["reason"] for row in rows), len(tars)


def run(config: PipelineConfig) -> PretokenizeReport:
    """Tokenize every shard into per-bucket WebDataset tars; resumable, exactly once."""
    started = time.time()
    storage = Storage(config.storage)
    workspace = absolute(config.workspace)
    stage_dir = join(workspace, "tokens")
    shards = read_marker(storage, join(workspace, "shards"), SUCCESS)
    tokenizers = read_marker(storage, join(workspace, "tokenizers"), SUCCESS)
    if shards is None:
        raise FileNotFoundError(f"{workspace}/shards/_SUCCESS.json not found: run `omni shard`")
    if tokenizers is None:
        raise FileNotFoundError(
            f"{workspace}/tokenizers/_SUCCESS.json not found: run `omni tokenizers train`"
        )
    stage_fingerprint = fingerprint(
        STAGE, config.pretokenize, shards["fingerprint"], tokenizers["fingerprint"]
    )
    start = begin_stage(storage, stage_dir, stage_fingerprint)
    if success := start.done:
        return PretokenizeReport(
            stage_dir,
            True,
            documents=success["documents"],
            buckets=success["buckets"],
            tars=success["tars"],
            quarantined=success["quarantined"],
            seconds=time.time() - started,
            notes=["already done with this config: nothing to do"],
        )
    notes = start.notes
    write_marker(storage, stage_dir, RUNNING, {"stage": STAGE, "fingerprint": stage_fingerprint})

    settings = _settings(config, storage, workspace)
    manifest = read_parquet(storage, join(settings.shards_dir, "manifest.parquet"))
    # Largest shards first: the pool's tail is then a small shard, not a video-heavy one.
    sizes = dict(zip(manifest["path"].to_pylist(), manifest["bytes"].to_pylist(), strict=True))
    parts = sorted(sizes, key=lambda path: (-sizes[path], path))
    done = [p for p in parts if storage.exists(marker_uri(stage_dir, p))]
    pending = [p for p in parts if p not in done]
    resumed = [json.loads(storage.read_bytes(marker_uri(stage_dir, p))) for p in done]
    started_ray = connect(config.ray)
    try:
        fresh, size = _run_pool(config, settings, pending) if pending else ([], 0)
        packed = _pack(config, settings, resumed + fresh)
    finally:
        disconnect(started_ray)
    buckets, quarantined, tar_count = _finish(storage, stage_dir, resumed + fresh, packed)
    report = PretokenizeReport(
        stage_dir,
        False,
        documents=sum(r["documents"] for r in resumed + fresh),
        buckets={b: {"samples": s["samples"], "tokens": s["tokens"]} for b, s in buckets.items()},
        tars=tar_count,
        quarantined=dict(sorted(quarantined.items())),
        resumed_shards=len(resumed),
        actors=size,
        devices=sorted({r["device"] for r in fresh}),
        gpu_ids=sorted({str(g) for r in fresh for g in r["gpus"]}),
        seconds=time.time() - started,
        notes=notes,
    )
    write_marker(
        storage,
        stage_dir,
        SUCCESS,
        success_payload(
            STAGE,
            stage_fingerprint,
            started,
            documents=report.documents,
            buckets=report.buckets,
            tars=report.tars,
            quarantined=report.quarantined,
            layout=tokenizers["layout"],
        ),
    )
    for leftover in ("_done", STAGED, PACKED, RUNNING):
        storage.remove(join(stage_dir, leftover), recursive=True)
    return report
