"""``omni run``'s end: run the workflow, print one screen on what each stage did.

:func:`execute` is shared by ``omni run`` on this machine and by the driver of a
submitted Ray Job (:mod:`.submit`), so both print the same summary and exit codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from infra import ray_runtime
from infra.config import ConfigError, redact_uri
from infra.worker_log import worker_log_dir
from pipelines.workflow.dag import pipeline_stages
from pipelines.workflow.run import WorkflowReport, run

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig

console = Console()
if not console.is_terminal:  # logs and pipes: wide enough that run ids and paths stay whole
    console = Console(width=160)
errors = Console(stderr=True)


def _ui_hint(config: PipelineConfig, workspace: str, run_id: str) -> str:
    """The command (or address) that opens the MLflow UI on the training run."""
    from infra.tracking import open_experiment, tracking_uri

    client, experiment_id = open_experiment(config.mlflow, workspace)
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    uri = tracking_uri(config.mlflow, workspace)
    if uri.startswith("http"):
        return f"open {redact_uri(uri).rstrip('/')}/{path}"
    return (
        f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
        f"   then open http://127.0.0.1:5000/{path}"
    )


def render_summary(report: WorkflowReport, config: PipelineConfig) -> None:
    """One screen: each stage's result and product, the MLflow run, the evaluation."""
    table = Table(title=f"omni run: {report.workspace} ({report.seconds:.0f} s)",
                  title_justify="left")  # fmt: skip
    for column in ("stage", "result", "attempts", "seconds", "produced / why"):
        table.add_column(column)
    for outcome in report.outcomes:
        detail = outcome.produced or outcome.reason
        if outcome.status == "failed":
            kind = "transient, retries used up" if outcome.transient else "not retried"
            detail = f"{outcome.reason} ({kind})"
        seconds = f"{outcome.seconds:.1f}" if outcome.attempts else ""
        table.add_row(outcome.stage, outcome.status, str(outcome.attempts or ""), seconds, detail)
    console.print(table)
    trained = report.markers.get("train")
    if trained:
        console.print(f"MLflow run: {trained['run_id']} (experiment {config.mlflow.experiment})")
        console.print(f"MLflow UI: {_ui_hint(config, report.workspace, trained['run_id'])}",
                      soft_wrap=True)  # fmt: skip
        logs = worker_log_dir(report.workspace, "train", trained["run_id"])
        console.print(f"worker logs: {logs}/rank-*.log", soft_wrap=True)
    evaluated = next((o.report for o in report.outcomes if o.stage == "eval" and o.report), None)
    if evaluated is not None:
        console.print(evaluated.sweep.table_markdown, soft_wrap=True)
        if evaluated.sweep.plot_path:
            console.print(f"plot: {evaluated.sweep.plot_path}")


def execute(config: PipelineConfig, start: str | None = None, only: str | None = None) -> int:
    """Run the workflow, print its summary, return the exit code."""
    try:
        report = run(config, pipeline_stages(), start=start, only=only,
                     ray_session=lambda: ray_runtime.session(config.ray))  # fmt: skip
    except ConfigError as exc:
        errors.print(f"error: {exc}", highlight=False, soft_wrap=True)
        return 2
    render_summary(report, config)
    failed = report.failed
    if failed is None:
        return 0
    errors.print(f"error: {failed.stage}: {failed.reason}", highlight=False, soft_wrap=True)
    return 2 if isinstance(failed.error, ConfigError) else 1
