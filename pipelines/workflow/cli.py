"""The ``omni run``, ``omni submit`` and ``omni status`` commands.

Thin wrappers, like every ``omni`` command: :mod:`.run` plans and runs the DAG of
:mod:`.dag`, :mod:`.summary` prints what it did, :mod:`.submit` talks to Ray Jobs and
:mod:`.status` reads the workspace; this module parses options, prints, and turns
outcomes into exit codes (0 done, 1 a stage failed, 2 a config error). Ray and the stages
are imported inside the commands, so ``--help`` and ``omni status`` never load them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from infra.config import ConfigError
from infra.storage import Storage, StorageError
from pipelines.config import load_pipeline_config
from pipelines.workflow.dag import pipeline_stages
from pipelines.workflow.run import StagePlan, plan, select
from pipelines.workflow.summary import console, errors, execute

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig


STAGE_HELP = "shard, tokenizers, pretokenize, train or eval"
ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Pipeline YAML.", show_default=False)
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override one value, e.g. --set train.max_steps=10.", show_default=False
    ),  # fmt: skip
]
AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray dashboard, e.g. http://HOST:8265 (or RAY_ADDRESS).",
        envvar="RAY_ADDRESS",
        show_default=False,
    ),  # fmt: skip
]


def _fail(message: str, code: int) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str] | None) -> PipelineConfig:
    try:
        return load_pipeline_config(config, overrides or [])
    except ConfigError as exc:
        _fail(str(exc), 2)
        raise


# ------------------------------------------------------------------ omni run


def plan_table(plans: list[StagePlan]) -> Table:
    table = Table(title="plan", title_justify="left")
    for column in ("stage", "action", "why"):
        table.add_column(column)
    for step in plans:
        table.add_row(step.stage, step.action, step.reason)
    return table


def run_command(
    config: ConfigOption,
    set_: SetOption = None,
    start: Annotated[
        str | None, typer.Option("--from", help=f"Start at this stage ({STAGE_HELP}).")
    ] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run this stage alone.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan (run or skip, and why); run nothing.")
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Run on this cluster as one Ray Job (http://HOST:8265); the default when "
            "ray.address names a remote cluster: port 8265 of its host.",
            show_default=False,
        ),  # fmt: skip
    ] = None,
) -> None:
    """Run the whole pipeline: shard -> tokenizers -> pretokenize -> train -> eval.

    A stage whose `_SUCCESS.json` fingerprint matches its config and inputs is skipped; a
    stage that runs makes every stage below it run. A stage failing on a transient error
    (connection reset, S3 5xx, dead Ray actor or node) is retried `workflow.retries` times;
    a config or input error is not. Ends with what each stage produced, the MLflow run and
    the command that opens the MLflow UI on it. Exit codes: 0 done, 1 a stage failed,
    2 invalid config.

    With a remote `ray.address` (or `--address`) the workflow runs on the cluster as one
    Ray Job, shipped and attached to as `omni submit run --wait` does (`--only S`: the job
    of `omni submit S`); its logs stream here, Ctrl-C detaches.
    """
    from pipelines.workflow import submit as jobs

    pipeline = _load(config, set_)
    if dry_run:
        try:
            plans = plan(pipeline, pipeline_stages(), Storage(pipeline.storage), start, only)
        except ConfigError as exc:
            _fail(str(exc), 2)
        except StorageError as exc:
            _fail(str(exc), 1)
        console.print(plan_table(plans))
        return
    cluster = address or jobs.jobs_address(pipeline.ray.address)
    if cluster:
        try:
            select(pipeline_stages(), start, only)  # refused here, not in the job
        except ConfigError as exc:
            _fail(str(exc), 2)
        _submit(cluster, pipeline, only or "run", start, wait=True)
        return
    raise typer.Exit(execute(pipeline, start, only))


# ------------------------------------------------------------------ omni submit


def submit_command(
    target: Annotated[
        str | None, typer.Argument(help=f"{STAGE_HELP}, or run for the whole pipeline.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Pipeline YAML.", show_default=False)
    ] = None,
    set_: SetOption = None,
    address: AddressOption = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Stream the job's logs; exit with its status.")
    ] = False,
    stop: Annotated[
        str | None, typer.Option("--stop", help="Stop the job with this submission id.")
    ] = None,
) -> None:
    """Submit a stage (or `run`, the whole pipeline) to a Ray cluster as a Ray Job.

    The job carries the project (`working_dir`) and its requirements (`submit.runtime_env`),
    so the cluster needs only Ray. Submitting the same work again attaches to its job.
    `--wait` streams the logs and exits with the job's status (0 succeeded, 1 failed);
    Ctrl-C detaches and leaves the job running. `--stop ID` stops a job.
    """
    from ray.job_submission import JobSubmissionClient

    if not address:
        _fail("--address http://HOST:8265 (or RAY_ADDRESS) is required", 2)
    if stop:
        stopped = JobSubmissionClient(address).stop_job(stop)
        console.print(f"{stop}: {'stopping' if stopped else 'already ended'}")
        return
    if target is None or config is None:
        _fail("give a stage (or run) and --config", 2)
    names = [stage.name for stage in pipeline_stages()]
    if target not in [*names, "run"]:
        _fail(f"{target}: no such stage; stages: {', '.join(names)}, or run", 2)
    _submit(address, _load(config, set_), target, None, wait)


def _submit(
    address: str, pipeline: PipelineConfig, target: str, start: str | None, wait: bool
) -> None:
    """Submit (or attach to) the job of ``target``; with ``wait``, follow it to its end."""
    from ray.job_submission import JobSubmissionClient

    from pipelines.workflow import submit as jobs

    client = JobSubmissionClient(address)
    try:
        inputs = jobs.input_fingerprint(pipeline)
        base = jobs.submission_base(pipeline, jobs.job_label(target, start), inputs)
        submission = jobs.submit(client, pipeline, target, base, start)
    except ConfigError as exc:
        _fail(str(exc), 2)
    job = submission.submission_id
    verb = "attached to" if submission.attached else "submitted"
    console.print(f"{verb} {job} ({submission.status})")
    if not wait:
        console.print(f"follow: ray job logs -f {job} --address {address}")
        return
    try:
        jobs.follow(client, job)
    except KeyboardInterrupt:
        console.print(f"\ndetached; {job} keeps running\n"
                      f"re-attach: ray job logs -f {job} --address {address} "
                      "(or run this command again)\n"
                      f"stop it: omni submit --stop {job} --address {address}",
                      soft_wrap=True)  # fmt: skip
        raise typer.Exit(130) from None
    status = str(client.get_job_status(job))
    if status != "SUCCEEDED":
        _fail(f"{job} {status}: {jobs.failure_reason(client, job)}", 1)
    console.print(f"{job} SUCCEEDED")


# ------------------------------------------------------------------ omni status


def status_command(
    config: ConfigOption,
    set_: SetOption = None,
    address: AddressOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """The pipeline's stages: done, running, failed or pending, with counts, durations,
    MLflow run id, Ray job id (with `--address`) and the reason of the last failure."""
    from pipelines.workflow.status import stage_statuses

    pipeline = _load(config, set_)
    jobs = None
    if address:
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(address).list_jobs()
    try:
        rows = stage_statuses(pipeline, pipeline_stages(), jobs)
    except StorageError as exc:
        _fail(str(exc), 1)
    if as_json:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
        return
    table = Table(title=f"omni status: {pipeline.workspace}", title_justify="left")
    for column in ("stage", "state", "produced", "seconds", "MLflow run", "Ray job", "reason"):
        table.add_column(column)
    for row in rows:
        job = f"{row.ray_job_id} ({row.ray_job_status})" if row.ray_job_id else ""
        seconds = f"{row.seconds:.0f}" if row.seconds is not None else ""
        table.add_row(row.stage, row.state, row.produced, seconds, row.mlflow_run_id or "", job,
                      row.reason)  # fmt: skip
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``run``, ``submit`` and ``status`` to the ``omni`` app."""
    app.command("run")(run_command)
    app.command("submit")(submit_command)
    app.command("status")(status_command)
