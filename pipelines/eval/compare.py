"""``omni eval compare``: the paradigm ablation's table over training runs.

Each run's latest finished evaluation per suite, grouped into variants by the
``model.*`` / ``train.*`` params that differ between the runs (the seed aside) and by
suite; each column (understanding, generation, retrieval, average) as mean +- standard
deviation over the group's seeds. Saved as ``compare.md`` / ``compare.json`` of a
``compare`` run of the experiment.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evaluation.checkpoint import EvalInputError
from evaluation.report import SCORES, category_scores
from infra.tracking import Tracker
from pipelines.eval.session import Session

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig


@dataclass
class CompareReport:
    """The ablation table: one row per variant (mean and spread over its seeds)."""

    rows: list[dict[str, Any]]
    table_markdown: str
    run_id: str | None
    notes: list[str] = field(default_factory=list)


def _variant(params: dict[str, str], differing: list[str]) -> str:
    return ", ".join(f"{k}={params.get(k, '-')}" for k in differing) or "all runs"


def compare(config: PipelineConfig, run_ids: list[str],
            suites: list[str] | None = None) -> CompareReport:  # fmt: skip
    """The ablation table of ``run_ids`` (restricted to ``suites`` when given)."""
    from mlflow.exceptions import MlflowException

    session = Session(config)
    client, notes = session.client, []
    runs = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except MlflowException:
            raise EvalInputError(f"unknown run id {run_id!r} in {client.tracking_uri}") from None
    keys = sorted({k for r in runs for k in r.data.params if k.split(".")[0] in ("model", "train")})
    differing = [k for k in keys if k != "train.seed"
                 and len({r.data.params.get(k) for r in runs}) > 1]  # fmt: skip
    groups: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        run_id = run.info.run_id
        query = f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`eval.status` = 'FINISHED'"
        latest: dict[str, Any] = {}
        for child in client.search_runs([run.info.experiment_id], query, max_results=1000):
            suite = child.data.tags.get("eval.suite", "default")
            step = int(child.data.tags.get("eval.checkpoint_step", 0))
            if suites and suite not in suites:
                continue
            if suite not in latest or step > latest[suite][0]:
                latest[suite] = (step, child.data.metrics)
        if not latest:
            notes.append(f"run {run_id}: no finished evaluation (run omni sweep first), left out")
            continue
        for suite, (_, metrics) in sorted(latest.items()):
            label = _variant(run.data.params, differing)
            label = (
                f"{label} [{suite}]" if (suites and len(suites) > 1) or len(latest) > 1 else label
            )
            groups.setdefault(label, []).append(category_scores(metrics))
    rows = []
    for label, scores in sorted(groups.items()):
        row: dict[str, Any] = {"variant": label, "runs": len(scores)}
        for column in SCORES:
            values = [s[column] for s in scores if column in s]
            if values:
                mean = sum(values) / len(values)
                spread = (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5
                row[column] = (mean, spread)
        rows.append(row)
    table = compare_markdown(rows)
    report_run = client.create_run(
        session.experiment_id if not runs else runs[0].info.experiment_id,
        run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"omni.stage": "compare", "compare.runs": ",".join(run_ids)[:5000]},
    )
    tracker = Tracker(client, report_run.info.run_id)
    tracker.log_bytes(table.encode(), "compare.md")
    tracker.log_bytes(json.dumps(rows, indent=2).encode(), "compare.json")
    client.set_terminated(report_run.info.run_id, "FINISHED")
    return CompareReport(rows, table, report_run.info.run_id, notes)


def compare_markdown(rows: list[dict[str, Any]]) -> str:
    """| variant | seeds | understanding | generation | retrieval | average | (mean +- sd)."""
    header = ["variant", "seeds", *(c.split("/")[1] for c in SCORES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" if c in row else "-" for c in SCORES]
        lines.append("| " + " | ".join([row["variant"], str(row["runs"]), *cells]) + " |")
    return "\n".join(lines) + "\n"
