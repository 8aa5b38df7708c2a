"""End-of-run summaries: one screen a person reads instead of a log to grep."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pipelines.shard import ShardReport


def _spread(values: list[int]) -> str:
    """min / median / max, the three numbers that say whether shards are balanced."""
    ordered = sorted(values)
    return f"{ordered[0]:,} / {ordered[len(ordered) // 2]:,} / {ordered[-1]:,} (min/median/max)"


def render_shard_report(report: ShardReport, console: Console) -> None:
    """Print documents in/out, shards, quarantine counts by reason and timing."""
    status = "skipped (already done)" if report.skipped else "done"
    table = Table(title=f"omni shard: {status}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("output", report.stage_dir)
    table.add_row("documents in", f"{report.documents_in:,}")
    table.add_row("documents out", f"{report.documents_out:,}")
    table.add_row("quarantined", f"{sum(report.quarantined.values()):,}")
    table.add_row("shards", f"{report.shards:,}")
    if report.shard_documents:
        table.add_row("documents per shard", _spread(report.shard_documents))
        table.add_row("planned tokens per shard", _spread(report.shard_planned_tokens))
    table.add_row("estimated tokens", f"{report.est_tokens:,}")
    if report.resumed_units:
        table.add_row("work units resumed", f"{report.resumed_units:,}")
    table.add_row("seconds", f"{report.seconds:.1f}")
    console.print(table)
    if report.signatures:
        signatures = Table("modalities", "documents", title_justify="left")
        for name, count in report.signatures.items():
            signatures.add_row(name, f"{count:,}")
        console.print(signatures)
    if report.quarantined:
        reasons = Table("quarantine reason", "documents", title_justify="left")
        for reason, count in report.quarantined.items():
            reasons.add_row(reason, f"{count:,}")
        console.print(reasons)
        console.print(f"details: {report.stage_dir}/quarantine.parquet")
    for note in report.notes:
        console.print(f"note: {note}")
