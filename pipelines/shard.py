"""``omni shard``: raw corpus -> validated, balanced Parquet shards with a manifest.

Two phases, each a Ray Data job whose rows are units of work (the img2dataset pattern:
the split and the shard are the units of work, resume and retry):

1. **validate** one task per input split (a JSONL byte range, a Parquet row range, a tar):
   read, resolve media, decode-check, embed bytes; write the accepted rows and the
   rejected ones to ``_staging/``; a ``.done.json`` marker is written last.
2. **pack** the accepted documents, in input order, into shards of balanced estimated
   tokens; one task writes one ``part-NNNNN.parquet`` (atomically), then its stats file.

A killed run is started again with the same command: finished splits and shards are
skipped, and since the packing is a pure function of the staged data, the final shards
hold exactly the same documents as an uninterrupted run. ``_SUCCESS.json`` is written
last; a run with the same fingerprint then does nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from pydantic import Field
from tqdm import tqdm

from infra.config import Section, fingerprint
from infra.ray_runtime import connect, disconnect
from infra.storage import TRANSIENT_ERRORS, Storage, StorageError, join
from pipelines.corpus import InputFile, absolute, expand_inputs
from pipelines.document_validation import TokenCosts, accept
from pipelines.documents import RawDocument, Rejected
from pipelines.media_checks import MediaLimits
from pipelines.readers import READERS, Split, SplitOptions
from pipelines.shard_packing import balanced_boundaries
from pipelines.stage_state import (
    RUNNING,
    SUCCESS,
    parquet_bytes,
    quarantine_table,
    read_marker,
    read_parquet,
    success_payload,
    write_marker,
)

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig

STAGE = "shard"

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
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("signatures", pa.string()),
    ]
)


class ShardConfig(Section):
    """The ``shard`` section. Token costs are estimates used only to balance shards."""

    target_tokens: int = Field(1_000_000, gt=0, description="estimated tokens per output shard")
    jsonl_split_bytes: int = Field(1 << 20, gt=0, description="JSONL bytes per work unit")
    parquet_split_rows: int = Field(512, gt=0, description="Parquet rows per work unit")
    row_group_rows: int = Field(256, gt=0, description="rows per row group in output shards")
    max_image_pixels: int = Field(
        50_000_000, gt=0, description="images above this, read from the header, are rejected"
    )
    max_media_bytes: int = Field(512 * 2**20, gt=0, description="media files above are rejected")
    video_probe_frames: int = Field(2, gt=0, description="frames decoded to validate a video")
    text_bytes_per_token: float = Field(4.0, gt=0, description="UTF-8 bytes per BPE token")
    tokens_per_image: int = Field(256, gt=0, description="image tokenizer: tokens per image")
    audio_tokens_per_second: float = Field(12.5, gt=0, description="audio tokenizer token rate")
    video_frames: int = Field(8, gt=0, description="frames sampled per video by the tokenizer")
    cpus_per_task: float = Field(1.0, gt=0, description="Ray CPUs reserved per work unit")


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
    resumed_units: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Context:
    """Everything a worker needs; small and picklable, shipped with each task."""

    storage: Storage
    staging: str
    stage_dir: str
    limits: MediaLimits
    costs: TokenCosts
    row_group_rows: int


# ---------------------------------------------------------------------------------------
# phase 1: validate one split
# ---------------------------------------------------------------------------------------
def _split_id(split: Split) -> str:
    return hashlib.sha1(split.key.encode()).hexdigest()[:16]


def _quarantine_row(raw: RawDocument, rejected: Rejected) -> dict[str, str]:
    return {
        "id": raw.id,
        "native_id": raw.native_id.encode("utf-8", "backslashreplace").decode("utf-8"),
        "source": raw.origin,
        "stage": STAGE,
        "reason": rejected.reason,
        "detail": rejected.detail.encode("utf-8", "backslashreplace").decode("utf-8"),
    }


def _read_all(split: Split, context: _Context) -> Iterable[RawDocument]:
    """The split's documents; a file that breaks mid-read yields one last rejection."""
    reader = READERS[split.format]
    try:
        yield from reader.read(context.storage, split)
    except (StorageError, *TRANSIENT_ERRORS):
        raise  # let Ray retry: the input may be fine once the network is
    except Exception as exc:
        yield RawDocument(
            f"<unreadable {split.key}>",
            f"{split.uri}",
            split.namespace,
            rejection=Rejected("unreadable_input", f"{type(exc).__name__}: {exc}"),
        )


def validate_split(row: dict[str, Any], context: _Context) -> dict[str, Any]:
    """Ray Data task: validate one split into staging; idempotent through its marker."""
    split = Split(**{k: row[k] for k in Split.__dataclass_fields__})
    split_id = _split_id(split)
    marker = join(context.staging, f"{split_id}.done.json")
    if context.storage.exists(marker):
        return {**json.loads(context.storage.read_bytes(marker)), "resumed": True}
    accepted, rejected = [], []
    for raw in _read_all(split, context):
        try:
            accepted.append(accept(raw, context.storage, context.limits, context.costs))
        except Rejected as reason:
            rejected.append(_quarantine_row(raw, reason))
    table = pa.Table.from_pylist(accepted, schema=DOCUMENT_SCHEMA)
    context.storage.write_bytes(join(context.staging, f"{split_id}.parquet"), parquet_bytes(table))
    context.storage.write_bytes(
        join(context.staging, f"{split_id}.quarantine.parquet"),
        parquet_bytes(quarantine_table(rejected)),
    )
    result = {
        "split_id": split_id,
        "accepted": len(accepted),
        "rejected": len(rejected),
        "reasons": json.dumps(Counter(r["reason"] for r in rejected)),
    }
    context.storage.write_bytes(marker, json.dumps(result).encode())
    return {**result, "resumed": False}


# ---------------------------------------------------------------------------------------
# phase 2: write one balanced shard
# ---------------------------------------------------------------------------------------
def write_shard(row: dict[str, Any], context: _Context) -> dict[str, Any]:
    """Ray Data task: gather one shard's rows from staging and publish it atomically."""
    name = row["name"]
    stats_uri = join(context.staging, f"{name}.stats.json")
    if context.storage.exists(stats_uri):
        return {**json.loads(context.storage.read_bytes(stats_uri)), "resumed": True}
    pieces = []
    for split_id, indices in json.loads(row["take"]):
        staged = read_parquet(context.storage, join(context.staging, f"{split_id}.parquet"))
        pieces.append(staged.take(indices))
    table = pa.concat_tables(pieces) if pieces else DOCUMENT_SCHEMA.empty_table()
    data = parquet_bytes(table, compression="zstd", row_group_size=context.row_group_rows)
    context.storage.write_bytes(join(context.stage_dir, name), data)
    stats = {
        "path": name,
        "documents": table.num_rows,
        "est_tokens": int(pc.sum(table["est_tokens"]).as_py() or 0),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "signatures": json.dumps(Counter(table["signature"].to_pylist()), sort_keys=True),
    }
    context.storage.write_bytes(stats_uri, json.dumps(stats).encode())
    return {**stats, "resumed": False}


def _plan_shards(
    storage: Storage, staging: str, split_ids: list[str], target_tokens: int
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Assign staged documents to shards; later duplicates of an id go to quarantine."""
    seen: set[str] = set()
    order: list[tuple[str, int]] = []
    tokens: list[int] = []
    duplicates: list[dict[str, str]] = []
    for split_id in split_ids:
        columns = ["id", "native_id", "origin", "est_tokens"]
        staged = read_parquet(storage, join(staging, f"{split_id}.parquet"), columns).to_pylist()
        for index, document in enumerate(staged):
            if document["id"] in seen:
                duplicates.append(
                    {
                        "id": document["id"],
                        "native_id": document["native_id"],
                        "source": document["origin"],
                        "stage": STAGE,
                        "reason": "duplicate_id",
                        "detail": "an earlier document of the same input has this id",
                    }
                )
                continue
            seen.add(document["id"])
            order.append((split_id, index))
            tokens.append(document["est_tokens"])
    shards = []
    for number, (start, end) in enumerate(balanced_boundaries(tokens, target_tokens)):
        take: dict[str, list[int]] = {}
        for split_id, index in order[start:end]:
            take.setdefault(split_id, []).append(index)
        name = f"part-{number:05d}.parquet"
        shards.append({"name": name, "take": json.dumps(list(take.items()))})
    return shards, duplicates


# ---------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------
def _run_units(
    function: Callable[..., dict[str, Any]],
    rows: list[dict[str, Any]],
    context: _Context,
    config: ShardConfig,
    description: str,
    on_result: Callable[[dict[str, Any], tqdm], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``function`` over ``rows`` as a Ray Data job, one row per task, with a bar.

    Ray Data re-runs a task whose worker died (its default ``max_retries=-1``); transient
    storage errors are retried inside :class:`Storage`. Either way a unit of work is
    idempotent, so a retry never duplicates output.
    """
    if not rows:
        return []
    _quiet_ray_data()
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
        function, fn_kwargs={"context": context}, num_cpus=config.cpus_per_task
    )
    results = []
    with tqdm(total=len(rows), desc=description, unit="unit", dynamic_ncols=True) as bar:
        for result in dataset.iter_rows():
            results.append(result)
            if on_result:
                on_result(result, bar)
            bar.update(1)
    return results


def _quiet_ray_data() -> None:
    """One progress bar of ours instead of Ray Data's per-operator bars and INFO logs."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled"


def _fingerprint(config: PipelineConfig, files: list[InputFile]) -> str:
    identity = [(f.namespace, f.format, f.size, f.version) for f in files]
    return fingerprint(STAGE, config.corpus, config.shard, identity)


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
        seconds=seconds,
        notes=[f"already done with fingerprint {success['fingerprint']}: nothing to do"],
    )


def run(config: PipelineConfig) -> ShardReport:
    """Run the shard stage for ``config``; safe to re-run, resumes where it stopped."""
    started = time.time()
    storage = Storage(config.storage)
    workspace = absolute(config.workspace)
    stage_dir = join(workspace, "shards")
    staging = join(stage_dir, "_staging")
    files = expand_inputs(config.corpus, storage)
    stage_fingerprint = _fingerprint(config, files)
    notes: list[str] = []

    success = read_marker(storage, stage_dir, SUCCESS)
    if success and success.get("fingerprint") == stage_fingerprint:
        return _report_from_success(stage_dir, success, time.time() - started)
    previous = success or read_marker(storage, stage_dir, RUNNING)
    if previous and previous.get("fingerprint") != stage_fingerprint:
        notes.append("config or inputs changed since the last run: output rebuilt from scratch")
        storage.remove(stage_dir, recursive=True)
    write_marker(storage, stage_dir, RUNNING, {"stage": STAGE, "fingerprint": stage_fingerprint})

    shard = config.shard
    options = SplitOptions(shard.jsonl_split_bytes, shard.parquet_split_rows)
    splits = [
        split
        for f in files
        for split in READERS[f.format].splits(storage, f.uri, f.namespace, f.media_root, options)
    ]
    context = _Context(
        storage=storage,
        staging=staging,
        stage_dir=stage_dir,
        limits=MediaLimits(shard.max_image_pixels, shard.max_media_bytes, shard.video_probe_frames),
        costs=TokenCosts(
            shard.text_bytes_per_token,
            shard.tokens_per_image,
            shard.audio_tokens_per_second,
            shard.video_frames,
        ),
        row_group_rows=shard.row_group_rows,
    )
    started_ray = connect(config.ray)
    try:
        totals: Counter[str] = Counter()

        def count(result: dict[str, Any], bar: tqdm) -> None:
            totals["accepted"] += result["accepted"]
            totals["rejected"] += result["rejected"]
            bar.set_postfix(docs=totals["accepted"], quarantined=totals["rejected"])

        validated = _run_units(
            validate_split, [s.to_row() for s in splits], context, shard, "validate", count
        )
        by_split = {r["split_id"]: r for r in validated}
        split_ids = [_split_id(s) for s in splits]
        plan, duplicates = _plan_shards(storage, staging, split_ids, shard.target_tokens)
        written = _run_units(write_shard, plan, context, shard, "write shards")
    finally:
        disconnect(started_ray)

    quarantine_parts = [
        read_parquet(storage, join(staging, f"{split_id}.quarantine.parquet"))
        for split_id in split_ids
    ]
    quarantine = pa.concat_tables([*quarantine_parts, quarantine_table(duplicates)])
    storage.write_bytes(join(stage_dir, "quarantine.parquet"), parquet_bytes(quarantine))
    manifest_rows = sorted(
        ({k: r[k] for k in MANIFEST_SCHEMA.names} for r in written), key=lambda r: r["path"]
    )
    storage.write_bytes(
        join(stage_dir, "manifest.parquet"),
        parquet_bytes(pa.Table.from_pylist(manifest_rows, schema=MANIFEST_SCHEMA)),
    )
    signatures: Counter[str] = Counter()
    for row in manifest_rows:
        signatures.update(json.loads(row["signatures"]))
    reasons = Counter(quarantine["reason"].to_pylist())
    documents_out = sum(r["documents"] for r in manifest_rows)
    report = ShardReport(
        stage_dir=stage_dir,
        skipped=False,
        documents_in=documents_out + quarantine.num_rows,
        documents_out=documents_out,
        shards=len(manifest_rows),
        quarantined=dict(sorted(reasons.items())),
        signatures=dict(sorted(signatures.items())),
        est_tokens=sum(r["est_tokens"] for r in manifest_rows),
        seconds=time.time() - started,
        resumed_units=sum(1 for r in [*validated, *written] if r["resumed"]),
        notes=notes,
    )
    if len(by_split) != len(splits):
        raise RuntimeError(f"{len(splits)} splits planned but {len(by_split)} reported")
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
            inputs=[f.uri for f in files],
        ),
    )
    storage.remove(staging, recursive=True)
    storage.remove(join(stage_dir, RUNNING))
    return report
