"""The ``omni`` command line: thin wrappers over each stage's ``run(config)``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel
from rich.console import Console

from infra.config import ConfigError
from infra.console_noise import quiet_libraries
from infra.storage import StorageError
from pipelines.config import load_pipeline_config
from pipelines.eval.cli import eval_app, generate_command, sweep_command
from pipelines.examples.cli import examples_app
from pipelines.pretokenize.config import PretokenizeConfig
from pipelines.shard.config import ShardConfig
from pipelines.tokenizers.config import WarmupConfig
from pipelines.train.config import ModelSection, TrainConfig
from pipelines.workflow.cli import register as register_workflow_commands

app = typer.Typer(
    help="Omnimodal discrete-flow-matching pipeline: shard -> pretokenize -> train -> evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console()
errors = Console(stderr=True)

ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        help="Pipeline YAML (configs/demo.yaml is the embedded default).",
        show_default=False,
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override one value, e.g. --set shard.target_tokens=500000 (repeatable).",
        show_default=False,
    ),
]


@app.callback()
def main() -> None:
    """Omnimodal DFM pipeline. Run `omni COMMAND --help` for a command's options."""
    # Local defaults that keep a laptop run quiet and offline; explicit env vars win.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    quiet_libraries()  # before a command imports DeepSpeed, torch or Ray Train


def _fail(message: str, code: int) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def settings_help(section: str, model: type[BaseModel]) -> str:
    """A markdown list of a section's keys, defaults and descriptions, for ``--help``."""
    lines = [
        f"**Settings** (`{section}:` section of the config, or `--set {section}.KEY=VALUE`):",
        "",
    ]
    lines += _setting_lines(section, model)
    return "\n".join(lines)


def _setting_lines(prefix: str, model: type[BaseModel]) -> list[str]:
    """One line per leaf setting; a nested section lists its own keys under its name."""
    lines = []
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            lines += _setting_lines(f"{prefix}.{name}", type(default))
            continue
        description = f": {field.description}" if field.description else ""
        lines.append(f"* `{prefix}.{name}` (default {default!r}){description}")
    return lines


@app.command(epilog=settings_help("shard", ShardConfig))
def shard(config: ConfigOption, set_: SetOption = None) -> None:
    """Read the raw corpus, validate every document and write balanced Parquet shards.

    Reads every `corpus.inputs` entry (jsonl, obelics Parquet, webdataset tar; local or
    s3://), checks that every image, audio clip and video decodes, embeds media bytes,
    and writes `<workspace>/shards/part-NNNNN.parquet`, `manifest.parquet`,
    `quarantine.parquet` (rejected documents with their reason) and `_SUCCESS.json`.

    Re-running with the same config does nothing; a killed run resumes where it stopped.
    Exit codes: 0 done (bad documents are quarantined, not fatal), 1 missing input or
    unreachable storage, 2 invalid config.
    """
    from pipelines.ray_units import UnitFailed
    from pipelines.shard import stage as shard_stage
    from pipelines.summary import render_shard_report

    try:
        pipeline = load_pipeline_config(config, set_ or [])
        report = shard_stage.run(pipeline)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except (FileNotFoundError, StorageError, UnitFailed) as exc:
        _fail(str(exc), 1)
    render_shard_report(report, console)


@app.command(epilog=settings_help("pretokenize", PretokenizeConfig))
def pretokenize(config: ConfigOption, set_: SetOption = None) -> None:
    """Turn `<workspace>/shards/` into WebDataset token shards, one folder per bucket.

    A pool of Ray actors (GPU actors when the cluster has GPUs) loads the tokenizers from
    `<workspace>/tokenizers/` once each and writes `<workspace>/tokens/<bucket>/*.tar`
    (`tokens.npy`, `modality.npy`, `meta.json` per sample), `manifest.parquet`,
    `quarantine.parquet`, `stats.json` and `_SUCCESS.json`. Exactly once and resumable:
    a killed run picks up where it stopped.
    """
    from pipelines.pretokenize import stage
    from pipelines.summary import render_pretokenize_report

    try:
        pipeline = load_pipeline_config(config, set_ or [])
        report = stage.run(pipeline)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except (FileNotFoundError, StorageError) as exc:
        _fail(str(exc), 1)
    render_pretokenize_report(report, console)


@app.command(
    epilog=settings_help("model", ModelSection) + "\n\n" + settings_help("train", TrainConfig)
)
def train(
    config: ConfigOption,
    set_: SetOption = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="MLflow run id to resume from its latest complete checkpoint.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Resume even if the token data or layout changed.")
    ] = False,
) -> None:
    """Train the DFM model on `<workspace>/tokens/` with Ray Train + DeepSpeed.

    One MLflow run per training (params, per-step losses, GradNorm weights, throughput,
    tags `checkpoint.latest` and the fingerprints); checkpoints under
    `<workspace>/checkpoints/<run_id>/step-NNNNNNN/` (DeepSpeed state, per-rank data and RNG
    state, and a consolidated `model/` that evaluation loads without DeepSpeed).

    `--resume RUN_ID` continues a run from its latest complete checkpoint with the model and
    train settings it was logged with, into the same MLflow run, step for step. A lost worker
    or node restarts the workers from the latest complete checkpoint by itself, up to
    `train.max_failures` times (metric `train/restarts`, tag `train.restart_cause`); a cluster
    without the workers' resources is waited for up to `train.resources_timeout_s`. SIGTERM or
    Ctrl-C checkpoints and stops (status KILLED); a second Ctrl-C aborts.
    Exit codes: 0 done or stopped, 1 missing input, unknown run or failed training, 2 config.
    """
    from pipelines import train as stage
    from pipelines.train.summary import render_train_report

    try:
        pipeline = load_pipeline_config(config, set_ or [])
        report = stage.run(pipeline, resume=resume, overrides=set_ or [], force=force)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except (FileNotFoundError, StorageError, stage.TrainInputError) as exc:
        _fail(str(exc), 1)
    except Exception as exc:  # failed workers, past train.max_failures: which and why
        _fail(f"training failed: {stage.recovery.error_cause(exc)}", 1)
    render_train_report(report, console, config)


tokenizers_app = typer.Typer(
    help="Train (warm up) and evaluate the image, audio and text tokenizers.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(tokenizers_app, name="tokenizers")


@tokenizers_app.command("train", epilog=settings_help("tokenizers.warmup", WarmupConfig))
def tokenizers_train(config: ConfigOption, set_: SetOption = None) -> None:
    """Warm the tokenizers up on `<workspace>/shards/` and save them.

    Trains the byte-level BPE on every text, the image VQ-VAE on images and video frames
    (reconstruction, patch-GAN and caption-contrastive losses) and the Whisper+VQ audio
    tokenizer on clips (mel reconstruction and transcript alignment), within the step and
    time budget of `tokenizers.warmup`. Held-out reconstruction is measured before and
    after; losses, codebook usage and reconstruction grids go to MLflow. Writes
    `<workspace>/tokenizers/{text,image,audio}/`, `vocab_layout.json` and `_SUCCESS.json`.
    """
    from pipelines.summary import render_tokenizers_report
    from pipelines.tokenizers import stage as tokenizers_stage

    try:
        pipeline = load_pipeline_config(config, set_ or [])
        report = tokenizers_stage.run(pipeline)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except (FileNotFoundError, StorageError) as exc:
        _fail(str(exc), 1)
    render_tokenizers_report(report, console)


@tokenizers_app.command("eval")
def tokenizers_eval(
    config: ConfigOption,
    media: Annotated[Path, typer.Option("--media", help="Folder of images, audio and video.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    set_: SetOption = None,
) -> None:
    """Reconstruction quality of the trained tokenizers on any folder of media.

    Image PSNR and SSIM (images and video frames), audio mel-L1, codebook usage and tokens
    per item, beside the same measures of a trivial codec with the same token budget (block
    means snapped to a k-means palette learned on the warm-up's training media): a tokenizer
    that does not beat it is not worth its decoder. Files a tokenizer refuses are listed.
    """
    import json

    from pipelines.summary import quality_table
    from pipelines.tokenizers import stage as tokenizers_stage

    try:
        pipeline = load_pipeline_config(config, set_ or [])
        result = tokenizers_stage.evaluate_media(pipeline, media)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except (FileNotFoundError, StorageError) as exc:
        _fail(str(exc), 1)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    items = ", ".join(f"{count} {kind}" for kind, count in result["items"].items())
    columns = {"tokenizer": result, "palette codec (same budget)": result["palette"]}
    console.print(quality_table(f"tokenizers on {media} ({items})", columns))
    for name, reason in result["rejected"].items():
        console.print(f"rejected {name}: {reason}")


register_workflow_commands(app)

app.add_typer(eval_app, name="eval")
app.command("generate")(generate_command)
app.command("sweep")(sweep_command)
app.add_typer(examples_app, name="examples")

if __name__ == "__main__":
    sys.exit(app())
