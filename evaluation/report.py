"""Sweep reports: the table (Markdown and CSV) and ``sweep.png``, from done records.

Rows are ``{"run_id", "run_name", "step", "status", "metrics": {...}, "headline": [...]}``.
The plot has one panel per headline metric, step on x, one line per run (markers, so a
run with a single evaluated checkpoint still shows). Pure functions returning bytes: the
caller decides where they go (workspace, MLflow).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and in cron
from matplotlib import pyplot as plt  # noqa: E402

SCORES = ("score/understanding", "score/generation", "score/retrieval", "score/average")
SUMMARY = (*SCORES, "speed/tokens_per_s")


def category_scores(metrics: dict[str, float]) -> dict[str, float]:
    """The ablation table's columns, each in [0, 1], higher is better (NExT-OMNI's layout):
    understanding = mean of caption BLEU-4 and ``1 - min(WER, 1)``; generation = mean token
    accuracy of the reference image / audio responses; retrieval = mean recall@1 over
    every direction; average = mean of those present. A category with no metric is left out.
    """
    understanding = [
        v for k, v in metrics.items() if k.startswith("understanding/") and k.endswith("/bleu")
    ]
    understanding += [1 - min(v, 1.0) for k, v in metrics.items() if k.endswith("/wer")]
    generation = [
        v for k, v in metrics.items() if k.startswith("generation/") and k.endswith("/accuracy")
    ]
    retrieval = [v for k, v in metrics.items() if k.startswith("retrieval/") and k.endswith("/r1")]
    out = {}
    for name, values in (
        ("understanding", understanding),
        ("generation", generation),
        ("retrieval", retrieval),
    ):
        if values:
            out[f"score/{name}"] = sum(values) / len(values)
    if out:
        out["score/average"] = sum(out.values()) / len(out)
    return out


def headline_metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The headline metric names of the finished rows, in first-seen order."""
    names: dict[str, None] = {}
    for row in rows:
        if row.get("status") == "finished":
            names.update(dict.fromkeys(row.get("headline", [])))
    return list(names)


def ordered(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["run_id"], int(r["step"])))


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table: run, step, status, then each metric (``-`` if missing)."""
    metrics = list(metrics if metrics is not None else headline_metrics(rows))
    header = ["run", "step", "status", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in ordered(rows):
        values = [_cell(row.get("metrics", {}).get(m, "-")) for m in metrics]
        name = row.get("run_name") or row["run_id"][:8]
        lines.append("| " + " | ".join([name, str(row["step"]), row["status"], *values]) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[dict[str, Any]]) -> str:
    """Every metric of every row, one row per (run, step)."""
    metrics = sorted({m for row in rows for m in row.get("metrics", {})})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["run_id", "run_name", "step", "status", *metrics])
    for row in ordered(rows):
        values = [row.get("metrics", {}).get(m, "") for m in metrics]
        writer.writerow(
            [row["run_id"], row.get("run_name", ""), row["step"], row["status"], *values]
        )
    return buffer.getvalue()


def plot_sweep(
    rows: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None
) -> tuple[bytes, dict[str, int]]:
    """(PNG bytes, lines drawn per metric): each metric against step, one line per run."""
    metrics = list(metrics if metrics is not None else headline_metrics(rows)) or ["(none)"]
    columns = min(3, len(metrics))
    count = -(-len(metrics) // columns)
    figure, axes = plt.subplots(count, columns, figsize=(4.2 * columns, 3.0 * count), squeeze=False)
    by_run: dict[str, list[dict[str, Any]]] = {}
    for row in ordered(rows):
        if row.get("status") == "finished":
            by_run.setdefault(row["run_id"], []).append(row)
    lines: dict[str, int] = {}
    for index, metric in enumerate(metrics):
        axis = axes[index // columns][index % columns]
        lines[metric] = 0
        for run_id, points in by_run.items():
            xy = [(int(r["step"]), r["metrics"][metric]) for r in points if metric in r["metrics"]]
            if xy:
                label = points[0].get("run_name") or run_id[:8]
                axis.plot(*zip(*xy, strict=True), marker="o", label=f"{label} {run_id[:6]}")
                lines[metric] += 1
        axis.set_title(metric, fontsize=9)
        axis.set_xlabel("step")
        if lines[metric]:
            axis.legend(fontsize=7)
    for index in range(len(metrics), count * columns):
        axes[index // columns][index % columns].axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue(), lines
