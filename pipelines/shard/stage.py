"""``omni shard``: raw corpus -> validated, balanced Parquet shards with a manifest.

The output shard is the unit of work, resume and retry (the img2dataset pattern):

1. **plan**: Ray tasks (one per input file) scan every split (a JSONL byte range, a
   Parquet row range) without touching media, counting documents and estimated tokens
   and hashing ids; consecutive splits are grouped into shards of balanced estimated tokens (a
   WebDataset tar is a shard of its own). The plan is saved as ``_plan.json``.
2. **write**: one Ray task per shard reads its splits, validates every
   document (media decoded once, here), embeds the media bytes and publishes
   ``part-NNNNN.parquet`` atomically, then its quarantine rows, then its stats marker.

Media are read and written exactly once. A killed run is started again with the same
command: the saved plan is reused and shards whose stats marker exists are skipped, so
the result holds exactly the documents of an uninterrupted run. ``_SUCCESS.json`` is
written last; a run with the same fingerprint then does nothing.

A medium that crashes its decoder natively (a segfault kills the task's worker on every
retry) is found by bisection over the shard's documents in throwaway tasks
(``ray_units.find_crashing``); the shard is then written with it quarantined as
``decoder_crashed``, so one bad medium never fails its shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray
from tqdm import tqdm

from infra.config import redact_uri
from infra.ray_runtime import connect, disconnect
from infra.storage import TRANSIENT_ERRORS, Storage, StorageError, join
from pipelines.corpus import InputFile, absolute, expand_inputs
from pipelines.ray_units import find_crashing, run_units
from pipelines.shard.config import ShardConfig
from pipelines.shard.documents import RawDocument, Rejected
from pipelines.shard.fingerprints import STAGE, expected_fingerprint
from pipelines.shard.media_checks import MediaLimits
from pipelines.shard.plan import ScanContext, plan_shards, scan_file
from pipelines.shard.readers import READERS, InputWarning, Split, SplitOptions
from pipelines.shard.validation import TokenCosts, accept
from pipelines.stage_state import (
    RUNNING,
    SUCCESS,
    begin_stage,
    parquet_bytes,
    quarantine_table,
    read_parquet,
    success_payload,
    write_marker,
)

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig

SEGMENT_TYPE = pa.struct(
    [
        ("type", pa.string()),
        ("text", pa.string()),
        ("bytes", pa.binary()),
        ("ext", pa.string()),
        ("path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("seconds", pa.float64()),
    ]
)

DOCUMENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("native_id", pa.string()),
        ("origin", pa.string()),
        ("signature", pa.string()),
        ("est_tokens", pa.int64()),
        ("segments", pa.list_(SEGMENT_TYPE)),
        ("metadata", pa.string()),
    ]
)

MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("documents", pa.int64()),
        ("est_tokens", pa.int64()),
        ("planned_tokens", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("signatures", pa.string()),
    ]
)


@dataclass
class ShardReport:
    """What a shard run did; rendered as the end-of-run summary."""

    stage_dir: str
    skipped: bool
    documents_in: int
    documents_out: int
    shards: int
    quarantined: dict[str, int]
    signatures: dict[str, int]
    est_tokens: int
    seconds: float
    empty_text_segments: int = 0
    resumed_units: int = 0
    shard_documents: list[int] = field(default_factory=list)
    shard_planned_tokens: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _WriteContext:
    """Everything a shard task needs; small and picklable, shipped with each task."""

    storage: Storage
    stage_dir: str
    limits: MediaLimits
    costs: TokenCosts
    row_group_rows: int


def _quarantine_row(raw: RawDocument, rejected: Rejected) -> dict[str, str]:
    def printable(text: str) -> str:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

    return {
        "id": raw.id,
        "native_id": printable(raw.native_id),
        "source": raw.origin,
        "stage": STAGE,
        "reason": rejected.reason,
        "detail": printable(rejected.detail),
    }


def _read_all(split: Split, storage: Storage) -> tuple[list[RawDocument], list[str]]:
    """The split's documents, and the reader's warnings about the file (InputWarning).

    A file that breaks mid-read gives the documents read so far and one last rejection.
    """
    documents: list[RawDocument] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)
        try:
            documents.extend(READERS[split.format].read(storage, split))
        except (StorageError, *TRANSIENT_ERRORS):
            raise  # fail the task so Ray retries it: the input may be fine once the network is
        except Exception as exc:
            documents.append(
                RawDocument(
                    f"<unreadable {split.key}>",
                    split.uri,
                    split.namespace,
                    rejection=Rejected("unreadable_input", f"{type(exc).__name__}: {exc}"),
                )
            )
    notes = []
    for caught_warning in caught:
        if issubclass(caught_warning.category, InputWarning):
            notes.append(str(caught_warning.message))
        else:  # not ours to collect: let it through as if never caught
            warnings.warn_explicit(
                caught_warning.message,
                caught_warning.category,
                caught_warning.filename,
                caught_warning.lineno,
            )
    return documents, notes


def _stats_uri(stage_dir: str, name: str) -> str:
    return join(stage_dir, "_stats", name.replace(".parquet", ".json"))


def _quarantine_uri(stage_dir: str, name: str) -> str:
    return join(stage_dir, "_quarantine", name)


def write_shard(row: dict[str, Any], context: _WriteContext) -> dict[str, Any]:
    """Ray task: validate one shard's documents and publish it; idempotent via its stats.

    Order of writes: the part file, its quarantine rows, then the stats marker. A task
    killed before the marker is simply redone; its outputs are overwritten atomically.
    """
    name, storage = row["name"], context.storage
    stats_uri = _stats_uri(context.stage_dir, name)
    if storage.exists(stats_uri):
        return {**json.loads(storage.read_bytes(stats_uri)), "resumed": True}
    duplicates = {key: set(positions) for key, positions in row["duplicates"]}
    crashed = {(key, position): reason for key, position, reason in row.get("crashed", [])}
    accepted, rejected, notes, empty_texts = [], [], [], 0
    for split_row in row["splits"]:
        split = Split.from_row(split_row)
        skip = duplicates.get(split.key, set())
        documents, split_notes = _read_all(split, storage)
        notes += split_notes
        for position, raw in enumerate(documents):
            try:
                if position in skip:
                    raise Rejected("duplicate_id", "an earlier document of the input has this id")
                if (split.key, position) in crashed:
                    raise Rejected("decoder_crashed", crashed[split.key, position])
                document = accept(raw, storage, context.limits, context.costs)
            except Rejected as reason:
                rejected.append(_quarantine_row(raw, reason))
                continue
            accepted.append(document)
            empty_texts += len(raw.segments) - len(document["segments"])  # accept drops them
    stats: dict[str, Any] = {
        "path": None,
        "documents": 0,
        "est_tokens": 0,
        "bytes": 0,
        "sha256": "",
        "signatures": "{}",
    }
    if accepted:
        table = pa.Table.from_pylist(accepted, schema=DOCUMENT_SCHEMA)
        data = parquet_bytes(table, compression="zstd", row_group_size=context.row_group_rows)
        storage.write_bytes(join(context.stage_dir, name), data)
        stats = {
            "path": name,
            "documents": len(accepted),
            "est_tokens": sum(r["est_tokens"] for r in accepted),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "signatures": json.dumps(Counter(r["signature"] for r in accepted), sort_keys=True),
        }
    storage.write_bytes(
        _quarantine_uri(context.stage_dir, name), parquet_bytes(quarantine_table(rejected))
    )
    stats["quarantined"] = len(rejected)
    stats["empty_text_segments"] = empty_texts
    stats["notes"] = notes
    stats["planned_tokens"] = row["est_tokens"]
    storage.write_bytes(stats_uri, json.dumps(stats).encode())
    return {**stats, "resumed": False}


def validate_documents(
    splits: list[dict[str, Any]], items: list[tuple[int, int]], context: _WriteContext
) -> None:
    """Ray task: validate documents ``(split index, position)`` of ``splits``, nothing more.

    A probe of crash isolation: if a medium crashes its decoder natively, this task's
    worker dies exactly when ``items`` holds that document.
    """
    wanted: dict[int, set[int]] = {}
    for index, position in items:
        wanted.setdefault(index, set()).add(position)
    for index, positions in wanted.items():
        documents, _ = _read_all(Split.from_row(splits[index]), context.storage)
        for position, raw in enumerate(documents):
            if position in positions:
                with contextlib.suppress(Rejected):
                    accept(raw, context.storage, context.limits, context.costs)


def _crash_isolation(
    context: _WriteContext, cpus: float
) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    """``isolate`` for ``run_units``: a shard spec whose task dies on every try comes back
    with the documents that crash it listed under ``crashed`` (quarantined unread)."""
    probe = ray.remote(validate_documents).options(num_cpus=cpus, max_retries=0)

    def isolate(row: dict[str, Any]) -> dict[str, Any] | None:
        splits = row["splits"]
        items = [
            (index, position)
            for index, split_row in enumerate(splits)
            for position in range(len(_read_all(Split.from_row(split_row), context.storage)[0]))
        ]
        culprits = find_crashing(lambda group: probe.remote(splits, group, context), items)
        if not culprits:
            return None
        reason = "its validation task's worker process died on it (a decoder crash)"
        keys = [Split.from_row(split_row).key for split_row in splits]
        return {**row, "crashed": [[keys[i], position, reason] for i, position in culprits]}

    return isolate


def _token_costs(shard: ShardConfig) -> TokenCosts:
    return TokenCosts(
        shard.text_bytes_per_token,
        shard.tokens_per_image,
        shard.audio_tokens_per_second,
        shard.video_frames,
        shard.audio_seconds_estimate,
    )


def _plan(config: PipelineConfig, files: list[InputFile], storage: Storage) -> list[dict]:
    """Scan the inputs (in parallel) and group their splits into shard specs."""
    shard = config.shard
    options = SplitOptions(shard.jsonl_split_bytes, shard.parquet_split_rows)
    per_file = [
        READERS[f.format].splits(storage, f.uri, f.namespace, f.media_root, options) for f in files
    ]
    to_scan = [
        {"splits": [s.to_row() for s in splits]}
        for f, splits in zip(files, per_file, strict=True)
        if not READERS[f.format].whole_file_shards
    ]
    scanned = run_units(
        scan_file,
        to_scan,
        {"context": ScanContext(storage, _token_costs(shard))},
        cpus_per_unit=shard.cpus_per_task,
        description="plan",
        retries=shard.task_retries,
    )
    by_key = {scan["key"]: scan for result in scanned for scan in result["scans"]}
    splits = [split for splits in per_file for split in splits]
    return [spec.to_row() for spec in plan_shards(splits, by_key, shard.target_tokens)]


def _report_from_success(stage_dir: str, success: dict[str, Any], seconds: float) -> ShardReport:
    return ShardReport(
        stage_dir=stage_dir,
        skipped=True,
        documents_in=success["documents_in"],
        documents_out=success["documents_out"],
        shards=success["shards"],
        quarantined=success["quarantined"],
        signatures=success["signatures"],
        est_tokens=success["est_tokens"],
        # absent from markers written before empty text segments were dropped and counted
        empty_text_segments=success.get("empty_text_segments", 0),
        seconds=seconds,
        notes=[f"already done with fingerprint {success['fingerprint']}: nothing to do"],
    )


def _finish(
    storage: Storage, stage_dir: str, written: list[dict[str, Any]], plan: list[dict]
) -> tuple[list[dict[str, Any]], pa.Table]:
    """Merge the per-shard quarantine files and write manifest.parquet and quarantine.parquet."""
    quarantine = pa.concat_tables(
        [read_parquet(storage, _quarantine_uri(stage_dir, spec["name"])) for spec in plan]
    )
    storage.write_bytes(join(stage_dir, "quarantine.parquet"), parquet_bytes(quarantine))
    manifest = sorted(
        ({k: r[k] for k in MANIFEST_SCHEMA.names} for r in written if r["path"]),
        key=lambda r: r["path"],
    )
    storage.write_bytes(
        join(stage_dir, "manifest.parquet"),
        parquet_bytes(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA)),
    )
    return manifest, quarantine


def run(config: PipelineConfig) -> ShardReport:
    """Run the shard stage for ``config``; safe to re-run, resumes where it stopped."""
    started = time.time()
    storage = Storage(config.storage)
    stage_dir = join(absolute(config.workspace), "shards")
    files = expand_inputs(config.corpus, storage)
    stage_fingerprint = expected_fingerprint(config, files)
    start = begin_stage(storage, stage_dir, stage_fingerprint)
    if start.done:
        return _report_from_success(stage_dir, start.done, time.time() - started)
    running, notes = start.running, start.notes

    shard = config.shard
    context = _WriteContext(
        storage=storage,
        stage_dir=stage_dir,
        limits=MediaLimits(shard.max_image_pixels, shard.max_media_bytes, shard.video_probe_frames),
        costs=_token_costs(shard),
        row_group_rows=shard.row_group_rows,
    )
    totals: Counter[str] = Counter()

    def count(result: dict[str, Any], bar: tqdm) -> None:
        totals["documents"] += result["documents"]
        totals["quarantined"] += result["quarantined"]
        bar.set_postfix(docs=totals["documents"], quarantined=totals["quarantined"])

    started_ray = connect(config.ray)
    try:
        if running and "plan" in running:
            plan = running["plan"]
        else:
            plan = _plan(config, files, storage)
            write_marker(
                storage,
                stage_dir,
                RUNNING,
                {"stage": STAGE, "fingerprint": stage_fingerprint, "plan": plan},
            )
        # Largest shards first: the last task running alone is then a small one.
        by_size = sorted(plan, key=lambda spec: -spec["est_tokens"])
        written = run_units(
            write_shard,
            by_size,
            {"context": context},
            cpus_per_unit=shard.cpus_per_task,
            description="shards",
            retries=shard.task_retries,
            on_result=count,
            isolate=_crash_isolation(context, shard.cpus_per_task),
        )
    finally:
        disconnect(started_ray)
    if len(written) != len(plan):
        raise RuntimeError(f"{len(plan)} shards planned but {len(written)} reported")

    manifest, quarantine = _finish(storage, stage_dir, written, plan)
    signatures: Counter[str] = Counter()
    for entry in manifest:
        signatures.update(json.loads(entry["signatures"]))
    documents_out = sum(entry["documents"] for entry in manifest)
    report = ShardReport(
        stage_dir=stage_dir,
        skipped=False,
        documents_in=documents_out + quarantine.num_rows,
        documents_out=documents_out,
        shards=len(manifest),
        quarantined=dict(sorted(Counter(quarantine["reason"].to_pylist()).items())),
        signatures=dict(sorted(signatures.items())),
        est_tokens=sum(entry["est_tokens"] for entry in manifest),
        seconds=time.time() - started,
        empty_text_segments=sum(r["empty_text_segments"] for r in written),
        resumed_units=sum(1 for r in written if r["resumed"]),
        shard_documents=[entry["documents"] for entry in manifest],
        shard_planned_tokens=[entry["planned_tokens"] for entry in manifest],
        notes=notes + sorted(note for r in written for note in r["notes"]),
    )
    write_marker(
        storage,
        stage_dir,
        SUCCESS,
        success_payload(
            STAGE,
            stage_fingerprint,
            started,
            documents_in=report.documents_in,
            documents_out=report.documents_out,
            shards=report.shards,
            quarantined=report.quarantined,
            signatures=report.signatures,
            est_tokens=report.est_tokens,
            empty_text_segments=report.empty_text_segments,
            inputs=[redact_uri(f.uri) for f in files],
        ),
    )
    for leftover in ("_stats", "_quarantine", RUNNING):
        storage.remove(join(stage_dir, leftover), recursive=True)
    return report
