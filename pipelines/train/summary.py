"""The one-screen summary of ``omni train``: where the run is and how to go on."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipelines.train.stage import TrainReport


def render_train_report(report: TrainReport, console: Console, config: Path | str) -> None:
    """Run id, status, losses, checkpoints, and the commands that resume or inspect it."""
    table = Table(title=f"omni train: {report.status.lower()} at step {report.step}")
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("MLflow run", f"{report.run_id} (experiment {report.experiment})")
    table.add_row("tracking", report.tracking_uri)
    if report.resumed_from is not None:
        table.add_row("resumed from", f"step {report.resumed_from}")
    for name, value in sorted(report.metrics.items()):
        table.add_row(name, f"{value:.4f}")
    table.add_row("checkpoints", report.checkpoints)
    table.add_row("latest", report.latest_checkpoint or "none")
    if report.logs is not None:
        table.add_row("worker logs", report.logs)
    table.add_row("seconds", f"{report.seconds:.1f}")
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(f"resume: omni train --config {config} --resume {report.run_id}", soft_wrap=True)
    if report.tracking_uri.startswith("sqlite:"):
        console.print(
            f"inspect: mlflow ui --backend-store-uri {report.tracking_uri}", soft_wrap=True
        )
