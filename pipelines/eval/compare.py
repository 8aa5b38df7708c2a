"""``omni eval compare``: the paradigm ablation's table over training runs.

Each run's latest finished evaluation per suite, grouped into variants by the
``model.*`` / ``train.*`` params that differ between the runs (the seed aside) and by
suite; each column (understanding, generation, retrieval, average) as mean +- standard
deviation over the group's seeds. A second table holds every metric that has a chance level
(the digit named in a caption or transcript, a generated medium recognised as its prompt,
retrieval recall@1), per variant, beside that chance: on a corpus of short closed-set
captions BLEU-4 is 0 whatever a model learns, so the paper's category columns alone cannot
show a ranking there. Saved as ``compare.md`` / ``compare.json`` of a ``compare`` run of
the experiment.
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


# A metric's suffix -> the suffix of its chance level, logged beside it by the eval tasks.
CHANCE_OF = {"/label_accuracy": "/label_chance", "/recognised": "/recognised_chance",
             "/r1": "/chance_r1"}  # fmt: skip


def _variant(params: dict[str, str], differing: list[str]) -> str:
    return ", ".join(f"{k}={params.get(k, '-')}" for k in differing) or "all runs"


def chance_metrics(metrics: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Metric -> (value, chance) for every metric of ``metrics`` with a chance level."""
    found = {}
    for name, value in metrics.items():
        for suffix, chance_suffix in CHANCE_OF.items():
            if name.endswith(suffix):
                chance = metrics.get(name.removesuffix(suffix) + chance_suffix)
                if chance is not None:
                    found[name] = (value, chance)
    return found


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


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
    learned: dict[str, list[dict[str, tuple[float, float]]]] = {}
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
            learned.setdefault(label, []).append(chance_metrics(metrics))
    rows = []
    for label, scores in sorted(groups.items()):
        row: dict[str, Any] = {"variant": label, "runs": len(scores)}
        for column in SCORES:
            values = [s[column] for s in scores if column in s]
            if values:
                row[column] = _mean_spread(values)
        row["metrics"] = {}  # metric -> (mean, spread, chance)
        for name in sorted({n for m in learned[label] for n in m}):
            present = [m[name] for m in learned[label] if name in m]
            row["metrics"][name] = (*_mean_spread([v for v, _ in present]), present[0][1])
        rows.append(row)
    table = compare_markdown(rows) + metrics_markdown(rows)
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
    for number, row in enumerate(rows, 1):
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" if c in row else "-" for c in SCORES]
        variant = f"({number}) {row['variant']}"
        lines.append("| " + " | ".join([variant, str(row["runs"]), *cells]) + " |")
    return "\n".join(lines) + "\n"


def metrics_markdown(rows: list[dict[str, Any]]) -> str:
    """| metric | chance | one column per variant (mean +- sd) |, for the metrics that have
    a chance level, the variants numbered as in ``compare_markdown``; empty when no run
    logged one."""
    names = sorted({name for row in rows for name in row.get("metrics", {})})
    if not names:
        return ""
    numbers = " | ".join(f"({n})" for n in range(1, len(rows) + 1))
    lines = ["", f"| metric | chance | {numbers} |", "|" + "---|" * (2 + len(rows))]
    for name in names:
        chance = next(r["metrics"][name][2] for r in rows if name in r["metrics"])
        cells = [
            f"{r['metrics'][name][0]:.3f} ± {r['metrics'][name][1]:.3f}"
            if name in r["metrics"]
            else "-"
            for r in rows
        ]
        lines.append(f"| {name} | {chance:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
