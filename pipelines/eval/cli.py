"""``omni eval``, ``omni eval compare``, ``omni generate`` and ``omni sweep``: thin typer
wrappers over :mod:`pipelines.eval.stage`, registered in :mod:`pipelines.cli`.

Exit codes: 0 done, 1 bad input (unknown run, no checkpoint, other vocabulary, wrong
input file, storage; a checkpoint another sweep is evaluating now), 2 invalid config,
3 evaluation failed (every attempt raised; the errors are recorded).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from evaluation.errors import EvalInputError, EvaluationFailed
from infra.config import ConfigError
from infra.storage import StorageError

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig
    from pipelines.eval.stage import SweepReport

T = TypeVar("T")

console = Console()
errors = Console(stderr=True)
DEFAULT_CONFIG = Path("configs/demo.yaml")

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Pipeline YAML (its eval: section names suites).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one value, e.g. --set eval.sweep.max_attempts=2."),
]
SuiteOption = Annotated[
    str | None, typer.Option("--suite", help="Suite of the eval: section (default: default).")
]
CheckpointOption = Annotated[
    int | None, typer.Option("--checkpoint", help="Checkpoint step (default: the latest).")
]

eval_app = typer.Typer(rich_markup_mode="markdown")


def _fail(message: str, code: int) -> NoReturn:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _config(path: Path, overrides: list[str] | None) -> PipelineConfig:
    from pipelines.config import load_pipeline_config

    return load_pipeline_config(path, overrides or [])


def _guarded(action: Callable[[], T]) -> T:
    """Run ``action``; map bad input and bad config to one line and an exit code."""
    try:
        return action()
    except ConfigError as error:
        _fail(str(error), 2)
    except (EvalInputError, FileNotFoundError, StorageError) as error:
        _fail(str(error), 1)
    except EvaluationFailed as error:
        _fail(str(error), 3)


def metrics_table(title: str, metrics: dict[str, float], headline: list[str]) -> Table:
    """Metric, value and (retrieval) chance level; headline metrics in bold."""
    table = Table(title=title)
    for column in ("metric", "value", "chance"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, value in sorted(metrics.items()):
        stem, _, last = name.rpartition("/")
        if last.startswith("chance_"):
            continue
        chance = metrics.get(f"{stem}/chance_{last}")
        style = "bold" if name in headline else None
        table.add_row(name, f"{value:.4g}", "" if chance is None else f"{chance:.3g}", style=style)
    return table


@eval_app.callback(invoke_without_command=True)
def eval_command(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Pipeline YAML.")] = None,
    run: Annotated[str | None, typer.Option("--run", help="MLflow id of a training run.")] = None,
    checkpoint: CheckpointOption = None,
    suite: SuiteOption = None,
    set_: SetOption = None,
) -> None:
    """Evaluate one checkpoint of a training run into a child MLflow run.

    Loads the checkpoint's consolidated weights (no DeepSpeed), runs the suite's tasks
    (retrieval, understanding, generation, speed) on the eval split of the token shards,
    logs a child run (`mlflow.parentRunId` = the training run; tags `eval.checkpoint_step`,
    `eval.suite`, `eval.status`), mirrors the headline metrics into the training run as
    `eval/<metric>` at the checkpoint's step, and prints a table. The checkpoint is then
    done for `omni sweep` too; one a sweep already evaluated is shown from its record.
    `omni eval compare RUN...` prints the ablation table of several runs.
    """
    if ctx.invoked_subcommand is not None:
        return
    if config is None or run is None:
        _fail("omni eval needs --config FILE and --run RUN_ID (or: omni eval compare RUN...)", 2)
    from pipelines.eval import stage as eval_stage

    result = _guarded(lambda: eval_stage.evaluate(_config(config, set_), run, checkpoint, suite))
    title = f"omni eval: run {result.run_id} step {result.step} suite {result.suite}"
    console.print(metrics_table(title, result.metrics, result.headline))
    for note in result.notes:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(f"child run {result.child_run_id} ({result.seconds:.1f} s)")


@eval_app.command("compare")
def compare_command(
    runs: Annotated[list[str], typer.Argument(help="Training run ids (seeds and variants).")],
    config: ConfigOption = DEFAULT_CONFIG,
    suite: Annotated[
        list[str] | None, typer.Option("--suite", help="Suites to compare (repeatable).")
    ] = None,
    set_: SetOption = None,
) -> None:
    """One table in the layout of the paper's ablation: understanding, generation,
    retrieval and their average per variant, mean +- spread over seeds; saved as an
    artifact of a `compare` run in the experiment."""
    from pipelines.eval import stage as eval_stage

    report = _guarded(lambda: eval_stage.compare(_config(config, set_), runs, suite or None))
    console.print(report.table_markdown, soft_wrap=True, markup=False, highlight=False)
    for note in report.notes:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(f"saved in MLflow run {report.run_id}")


def generate_command(
    run: Annotated[str, typer.Option("--run", help="MLflow id of a training run.")],
    input_: Annotated[
        str, typer.Option("--input", help="Text, or an image/audio/video/.txt file.")
    ],
    to: Annotated[str, typer.Option("--to", help="text, image or audio.")],
    out: Annotated[Path, typer.Option("--out", help="File to write: .txt, .png or .wav.")],
    config: ConfigOption = DEFAULT_CONFIG,
    checkpoint: CheckpointOption = None,
    suite: SuiteOption = None,
    set_: SetOption = None,
) -> None:
    """Any-to-any generation from a checkpoint: a caption for an image or video, a
    transcript for an audio clip, an image or an audio clip for a text."""
    from pipelines.eval import stage as eval_stage

    if to not in ("text", "image", "audio"):
        _fail(f"--to {to}: expected text, image or audio", 2)
    result = _guarded(
        lambda: eval_stage.generate_file(
            _config(config, set_), run, input_, to, out, checkpoint, suite
        )
    )
    console.print(
        f"{result.kind} -> {result.target} with run {result.run_id} step {result.step}: "
        f"{result.out} ({result.seconds:.1f} s)",
        soft_wrap=True,
    )


def sweep_command(
    config: ConfigOption,
    experiment: Annotated[
        str | None, typer.Option("--experiment", help="MLflow experiment (default: the config's).")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="One sweep, then exit (for cron).")] = False,
    every: Annotated[
        float | None, typer.Option("--every", help="Sweep every SECONDS until stopped.")
    ] = None,
    suite: SuiteOption = None,
    set_: SetOption = None,
) -> None:
    """Evaluate every checkpoint of the experiment's training runs that has no finished
    evaluation, once each, in step order; concurrent sweeps never evaluate one twice.
    Writes a report (table in Markdown and CSV, `sweep.png`) into the experiment."""
    from pipelines.eval import stage as eval_stage

    if once == (every is not None):
        _fail("give exactly one of --once and --every SECONDS", 2)
    while True:
        report = _guarded(lambda: eval_stage.sweep(_config(config, set_), experiment, None, suite))
        render_sweep(report)
        if once:
            return
        time.sleep(every)


def render_sweep(report: SweepReport) -> None:
    """The table of every evaluated checkpoint in scope, counts, notes, report paths."""
    console.print(report.table_markdown, soft_wrap=True, markup=False, highlight=False)
    for note in report.notes:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(
        f"sweep ({report.suite}): {report.evaluated} evaluated, {report.failed} failed, "
        + (f"{report.repaired} repaired, " if report.repaired else "")
        + f"{report.skipped} skipped in {report.seconds:.1f} s",
        soft_wrap=True,
    )
    if report.plot_path:
        console.print(f"sweep.png: {report.plot_path}", soft_wrap=True)
