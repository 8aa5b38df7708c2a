"""A sweep's report: the table (Markdown, CSV) and ``sweep.png`` (each metric against
step, one line per run), in the workspace and, when the sweep changed something, as the
artifacts of a ``sweep`` run of the experiment."""

from __future__ import annotations

import time
from typing import Any

from evaluation.report import csv_table, headline_metrics, markdown_table, plot_sweep
from infra.storage import join
from infra.tracking import Tracker
from pipelines.eval.session import Session


def write_report(
    session: Session,
    experiment: str | None,
    suite: str,
    rows: list[dict[str, Any]],
    counts: dict[str, int] | None,
) -> tuple[str | None, str | None]:
    """Write the report of ``rows``; (path of ``sweep.png``, id of the report run).

    ``counts`` is None for a sweep that changed nothing: the existing report is reused
    and no run is created, so a sweep from cron that finds nothing adds nothing.
    """
    if not rows:
        return None, None
    folder = join(session.workspace, "eval", "reports", experiment or "runs", suite)
    plot = join(folder, "sweep.png")
    if counts is None and session.storage.exists(plot):
        return plot, None
    png, _ = plot_sweep(rows, headline_metrics(rows))
    files = {
        "sweep.md": markdown_table(rows).encode(),
        "sweep.csv": csv_table(rows).encode(),
        "sweep.png": png,
    }
    for name, data in files.items():
        session.storage.write_bytes(join(folder, name), data)
    if counts is None:
        return plot, None
    experiment_id = session.experiment_id
    if experiment:
        found = session.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else experiment_id
    run = session.client.create_run(
        experiment_id,
        run_name=f"sweep-{suite}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"omni.stage": "sweep", "eval.suite": suite},
    )
    tracker = Tracker(session.client, run.info.run_id)
    tracker.log_metrics(counts, step=0)
    for name, data in files.items():
        tracker.log_bytes(data, name)
    session.client.set_terminated(run.info.run_id, "FINISHED")
    return plot, run.info.run_id
