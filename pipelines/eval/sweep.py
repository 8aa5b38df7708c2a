"""``omni sweep``: every complete checkpoint of an experiment's training runs, once.

The pattern is img2dataset's "the shard is the unit of work", with a checkpoint as the
shard: list the complete checkpoints of the training runs in scope, drop those with a
done record (left by a sweep or by ``omni eval``), and evaluate the rest in step order,
each through :func:`~pipelines.eval.exactly_once.evaluate_exactly_once`, so concurrent or
repeated sweeps evaluate every checkpoint exactly once. A run that cannot be evaluated
(not a training run, no checkpoint yet, another vocabulary) is skipped with a note; the
sweep goes on. First, what dead sweeps left behind is settled: child runs still
``RUNNING`` whose attempt's lease lapsed are ended (or completed, if their result was
published; :mod:`pipelines.eval.stale_children`). The report is written by
:mod:`pipelines.eval.sweep_report`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evaluation.checkpoint import EvalInputError, run_dir
from evaluation.report import SUMMARY, markdown_table
from pipelines.eval.exactly_once import check_evaluable, evaluate_exactly_once
from pipelines.eval.session import Session, suite_config
from pipelines.eval.stale_children import end_stale_children
from pipelines.eval.sweep_report import write_report
from training.checkpointing import complete_steps

if TYPE_CHECKING:
    from mlflow.entities import Run

    from pipelines.config import PipelineConfig

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """What a sweep did: counts, one row per evaluated checkpoint in scope, the report."""

    experiment: str | None
    suite: str
    evaluated: int
    skipped: int  # runs left out with a reason (not a train run, no checkpoint, layout)
    failed: int
    rows: list[dict[str, Any]]
    table_markdown: str
    plot_path: str | None
    report_run_id: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    already_done: int = 0  # checkpoints in scope with a done record before this sweep
    repaired: int = 0  # results a dead sweep published, completed by this one


@dataclass
class _Candidate:
    run_id: str
    run_name: str
    start_time: int
    steps: list[int]
    experiment_id: str


def _runs(session: Session, experiment: str | None, run_ids: list[str] | None,
          notes: list[str]) -> tuple[list[Run], int]:  # fmt: skip
    """``run_ids`` (unknown ones noted) or every training run of the experiment."""
    from mlflow.exceptions import MlflowException

    client = session.client
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException:
                notes.append(f"run {run_id}: unknown run id, skipped")
        return runs, len(run_ids) - len(runs)
    name = experiment or session.config.mlflow.experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise EvalInputError(f"no MLflow experiment named {name!r} at {client.tracking_uri}")
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id], "tags.`omni.stage` = 'train'", max_results=1000, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs, 0


def _train_runs(
    session: Session, experiment: str | None, run_ids: list[str] | None, notes: list[str]
) -> tuple[list[_Candidate], int]:
    """The training runs in scope with their complete checkpoints; (runs, runs skipped)."""
    runs, skipped = _runs(session, experiment, run_ids, notes)
    found = []
    for run in runs:
        run_id = run.info.run_id
        if run.data.tags.get("omni.stage") != "train":
            notes.append(f"run {run_id}: not an omni train run, skipped")
            skipped += 1
            continue
        steps = complete_steps(session.storage, run_dir(session.workspace, run_id))
        if not steps:
            notes.append(f"run {run_id}: no complete checkpoint yet, skipped")
            skipped += 1
            continue
        name, start = run.info.run_name or run_id, int(run.info.start_time or 0)
        found.append(_Candidate(run_id, name, start, steps, run.info.experiment_id))
    return found, skipped


def sweep(
    config: PipelineConfig,
    experiment: str | None = None,
    run_ids: list[str] | None = None,
    suite: str | None = None,
) -> SweepReport:
    """Evaluate every complete, not yet evaluated checkpoint of the experiment's training
    runs (or of ``run_ids``) once, in step order; then write the report."""
    started = time.time()
    suite_name, _ = suite_config(config, suite or config.eval.sweep.suite)
    session = Session(config)
    store = session.claims(suite_name)
    notes: list[str] = []
    candidates, skipped = _train_runs(session, experiment, run_ids, notes)
    settled = end_stale_children(
        session.client,
        store,
        suite_name,
        {c.experiment_id for c in candidates},
        {c.run_id for c in candidates},
    )
    notes += settled.notes
    repaired = len(settled.completed)
    pending, already_done = [], 0
    for candidate in candidates:
        done = store.done_steps(candidate.run_id)
        already_done += len(set(done) & set(candidate.steps))
        pending += [
            (step, candidate.start_time, candidate) for step in candidate.steps if step not in done
        ]
    pending.sort(key=lambda item: (item[0], item[1]))
    evaluated = failed = 0
    bad: set[str] = set()
    for step, _, candidate in pending:
        if candidate.run_id in bad:
            continue
        try:
            check_evaluable(session, candidate.run_id, step)
        except EvalInputError as error:
            bad.add(candidate.run_id)
            notes.append(f"run {candidate.run_id}: {error}; skipped")
            log.warning("sweep skips run %s: %s", candidate.run_id, error)
            skipped += 1
            continue
        outcome = evaluate_exactly_once(session, store, candidate.run_id, step, suite_name)
        evaluated += outcome.status == "finished"
        repaired += outcome.status == "repaired"
        failed += outcome.status == "failed"
        if outcome.note:
            notes.append(outcome.note)
    scope = {c.run_id: c.run_name for c in candidates}
    rows = [
        {**record, "run_name": scope[record["run_id"]]}
        for record in store.all_done()
        if record["run_id"] in scope
    ]
    report = SweepReport(
        experiment=experiment or (None if run_ids else config.mlflow.experiment),
        suite=suite_name,
        evaluated=evaluated,
        skipped=skipped,
        failed=failed,
        rows=sorted(rows, key=lambda r: (r["run_id"], r["step"])),
        table_markdown=markdown_table(rows, [m for m in SUMMARY if _any_has(rows, m)]),
        plot_path=None,
        notes=notes,
        already_done=already_done,
        repaired=repaired,
    )
    report.plot_path, report.report_run_id = write_report(
        session, report.experiment, suite_name, report.rows, _counts(report)
    )
    report.seconds = round(time.time() - started, 2)
    return report


def _any_has(rows: list[dict[str, Any]], metric: str) -> bool:
    return any(metric in row.get("metrics", {}) for row in rows)


def _counts(report: SweepReport) -> dict[str, int] | None:
    """The sweep's counts for its report run; None when it changed nothing."""
    if not (report.evaluated or report.failed or report.repaired):
        return None
    return {
        "sweep/evaluated": report.evaluated,
        "sweep/failed": report.failed,
        "sweep/skipped": report.skipped,
        "sweep/repaired": report.repaired,
    }
