"""Planning the shard stage: scan splits cheaply, then group them into balanced shards.

The plan is a pure function of the inputs and the config, so a killed run that plans
again (or reloads the saved plan) writes exactly the same shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infra.storage import Storage
from pipelines.shard.packing import balanced_boundaries
from pipelines.shard.readers import READERS, Split
from pipelines.shard.validation import TokenCosts


@dataclass(frozen=True)
class ScanContext:
    storage: Storage
    costs: TokenCosts


def id_hash(document_id: str) -> int:
    """A 60-bit integer from a stable id (hex digest), compact for duplicate detection."""
    return int(document_id[:15], 16)


def scan_file(row: dict[str, Any], context: ScanContext) -> dict[str, Any]:
    """Ray task: estimated tokens and id hashes of every split of one file.

    Scanning parses documents but never touches media, so one task per file is enough;
    finer tasks measured slower (scheduling cost exceeds the work). Hashes come back in
    document order so the planner can find duplicates.
    """
    scans = []
    for split_row in row["splits"]:
        split = Split.from_row(split_row)
        hashes, tokens = [], 0
        for raw in READERS[split.format].scan(context.storage, split):
            hashes.append(id_hash(raw.id))
            tokens += context.costs.estimate(raw) if raw.rejection is None else 0
        scans.append({"key": split.key, "est_tokens": tokens, "hashes": hashes})
    return {"scans": scans}


@dataclass
class ShardSpec:
    """One output shard: the splits it is made of, and the positions to drop as duplicates."""

    name: str
    splits: list[dict[str, Any]]
    duplicates: dict[str, list[int]]
    est_tokens: int

    def to_row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "splits": self.splits,
            "duplicates": sorted(self.duplicates.items()),
            "est_tokens": self.est_tokens,
        }


def plan_shards(
    splits: list[Split], scans: dict[str, dict[str, Any]], target_tokens: int
) -> list[ShardSpec]:
    """Group consecutive splits into shards of balanced estimated tokens.

    Splits of whole-file formats (tars) are shards of their own. A document whose id was
    seen earlier in the plan is marked as a duplicate at its position in its split.
    """
    seen: set[int] = set()
    duplicates: dict[str, list[int]] = {}
    for split in splits:
        for position, value in enumerate(scans.get(split.key, {}).get("hashes", [])):
            if value in seen:
                duplicates.setdefault(split.key, []).append(position)
            seen.add(value)

    groups: list[list[Split]] = []
    run: list[Split] = []

    def close_run() -> None:
        tokens = [scans[s.key]["est_tokens"] for s in run]
        groups.extend(run[start:end] for start, end in balanced_boundaries(tokens, target_tokens))
        run.clear()

    for split in splits:
        if READERS[split.format].whole_file_shards:
            close_run()
            groups.append([split])
        else:
            run.append(split)
    close_run()

    return [
        ShardSpec(
            name=f"part-{number:05d}.parquet",
            splits=[s.to_row() for s in group],
            duplicates={s.key: duplicates[s.key] for s in group if s.key in duplicates},
            est_tokens=sum(scans.get(s.key, {}).get("est_tokens", 0) for s in group),
        )
        for number, group in enumerate(groups)
    ]
