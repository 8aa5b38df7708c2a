"""End-of-run summaries: one screen a person reads instead of a log to grep."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pipelines.pretokenize.stage import PretokenizeReport
from pipelines.shard.stage import ShardReport
from pipelines.tokenizers.stage import TokenizersReport


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
    if report.empty_text_segments:
        table.add_row("empty text segments dropped", f"{report.empty_text_segments:,}")
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


QUALITY_ROWS = (
    ("image_psnr", "image PSNR (dB, higher is better)", "{:.2f}"),
    ("image_ssim", "image SSIM (higher is better)", "{:.3f}"),
    ("image_usage", "image codebook usage", "{:.1%}"),
    ("audio_mel_l1", "audio mel-L1 (lower is better)", "{:.4f}"),
    ("audio_usage", "audio codebook usage", "{:.1%}"),
    ("image_tokens_per_item", "tokens per image", "{:.0f}"),
    ("audio_tokens_per_item", "tokens per audio clip (mean)", "{:.1f}"),
    ("video_tokens_per_item", "tokens per video", "{:.0f}"),
)


def quality_table(title: str, columns: dict[str, dict[str, float]]) -> Table:
    """Metrics as rows, one column per measurement (e.g. before / after)."""
    table = Table("metric", *columns, title=title, title_justify="left")
    for key, label, fmt in QUALITY_ROWS:
        if any(key in values for values in columns.values()):
            cells = [fmt.format(v[key]) if key in v else "-" for v in columns.values()]
            table.add_row(label, *cells)
    return table


def render_tokenizers_report(report: TokenizersReport, console: Console) -> None:
    """Data used, steps run and held-out quality before and after the warm-up, beside the
    palette codec of the same token budget (is the tokenizer worth its decoder?)."""
    status = "skipped (already done)" if report.skipped else "done"
    table = Table(title=f"omni tokenizers train: {status}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("output", report.stage_dir)
    if not report.skipped:
        table.add_row("texts (BPE)", f"{report.texts:,}")
        table.add_row("images train / held out", "{:,} / {:,}".format(*report.images))
        table.add_row("audio clips train / held out", "{:,} / {:,}".format(*report.audio))
        for name, steps in report.steps.items():
            table.add_row(f"{name} steps", f"{steps:,}")
        for reason, count in report.rejected_media.items():
            table.add_row(f"rejected: {reason}", f"{count:,}")
    table.add_row("unified vocabulary", f"{report.vocab_size:,}")
    table.add_row("MLflow run", report.run_id or "-")
    table.add_row("seconds", f"{report.seconds:.1f}")
    console.print(table)
    console.print(
        quality_table(
            "held-out reconstruction",
            {"before": report.before, "after": report.after, "palette codec": report.palette},
        )
    )
    for note in report.notes:
        console.print(f"note: {note}")


def render_pretokenize_report(report: PretokenizeReport, console: Console) -> None:
    """The per-bucket table: samples, tokens, mean length; then quarantine counts."""
    status = "skipped (already done)" if report.skipped else "done"
    head = Table(title=f"omni pretokenize: {status}", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column(justify="right")
    head.add_row("output", report.stage_dir)
    head.add_row("documents", f"{report.documents:,}")
    head.add_row("tars", f"{report.tars:,}")
    if not report.skipped:
        head.add_row("actors", f"{report.actors} on {', '.join(report.devices) or '-'}")
        if report.resumed_shards:
            head.add_row("shards resumed", f"{report.resumed_shards:,}")
        head.add_row("seconds", f"{report.seconds:.1f}")
    console.print(head)
    buckets = Table("bucket", "samples", "tokens", "mean length", title_justify="left")
    for name, counts in report.buckets.items():
        mean = counts["tokens"] / max(1, counts["samples"])
        buckets.add_row(name, f"{counts['samples']:,}", f"{counts['tokens']:,}", f"{mean:,.0f}")
    console.print(buckets)
    if report.quarantined:
        reasons = Table("quarantine reason", "documents", title_justify="left")
        for reason, count in report.quarantined.items():
            reasons.add_row(reason, f"{count:,}")
        console.print(reasons)
    for note in report.notes:
        console.print(f"note: {note}")
