"""``omni examples``: build example corpora. Light at import (Typer only): the builders and
their numpy, scikit-learn, PyAV and eSpeak NG load when a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

examples_app = typer.Typer(
    help="Build example corpora from data that ships inside installed packages (no download).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
console = Console()
errors = Console(stderr=True)


@examples_app.callback()
def examples() -> None:
    """Build example corpora. Run `omni examples COMMAND --help` for a command's options."""


@examples_app.command("digits")
def digits(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to write (created or replaced).")
    ],
    image_size: Annotated[
        int, typer.Option(help="Side of images and video frames in px (the image tokenizer's).")
    ] = 64,
    seed: Annotated[
        int, typer.Option(help="Seed of captions, voices' settings, videos, sums.")
    ] = 0,
    limit: Annotated[
        int | None,
        typer.Option(help="At most this many documents per task (both splits kept): quick builds."),
    ] = None,
    speech: Annotated[
        bool, typer.Option("--speech/--no-speech", help="Synthesise speech (needs the extra).")
    ] = True,
    clips_per_digit: Annotated[int, typer.Option(help="Clips of each digit per voice.")] = 2,
    numbers_per_voice: Annotated[int, typer.Option(help="Numbers 10..99 per voice.")] = 4,
    videos: Annotated[int, typer.Option(help="Drifting-digit videos.")] = 600,
    sums: Annotated[int, typer.Option(help="Interleaved sums of digits.")] = 600,
    spoken_written: Annotated[int, typer.Option(help="Interleaved spoken + written digits.")] = 400,
    caption_templates: Annotated[
        int | None,
        typer.Option(
            help="Use only the first N caption templates of images and videos "
            "(default: all; 1: one fixed template, which a small DFM run can learn)."
        ),
    ] = None,
) -> None:
    """Build the digits corpus: handwritten digits, spoken numbers, videos, interleaved.

    Images are the UCI handwritten digits that scikit-learn ships (CC BY 4.0), speech is
    synthesised with eSpeak NG (GPL-3.0, the optional `examples` extra:
    `pip install 'omni-dfm[examples]'`), videos move the digits. Writes `docs.jsonl`
    (the `jsonl` corpus format; every document has `task`, `split` and, with one class,
    `label`), `media/`, README.md and LICENSES.md. The same options give the same bytes.
    Exit codes: 0 built, 1 build failed (nothing in `--out` changed), 2 bad options.
    """
    from pipelines.examples.digits import CorpusBuildError, DigitsOptions, InvalidOptions, build
    from pipelines.examples.speech import SpeechFailed, SpeechUnavailable

    options = DigitsOptions(
        image_size=image_size,
        seed=seed,
        limit=limit,
        speech=speech,
        clips_per_digit=clips_per_digit,
        numbers_per_voice=numbers_per_voice,
        videos=videos,
        sums=sums,
        spoken_written=spoken_written,
        caption_templates=caption_templates,
    )
    try:
        with console.status(f"building the digits corpus in {out} ..."):
            report = build(out, options)
    except (CorpusBuildError, SpeechUnavailable, SpeechFailed, OSError) as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2 if isinstance(exc, InvalidOptions) else 1) from None
    table = Table(title=f"digits corpus in {report.out}")
    for column in ("task", "train", "eval", "all"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, splits in report.counts.items():
        table.add_row(task, str(splits["train"]), str(splits["eval"]), str(sum(splits.values())))
    console.print(table)
    console.print(
        f"{report.documents} documents, {report.files} files, {report.bytes / 2**20:.1f} MiB "
        f"in {report.seconds:.1f} s; corpus input: {{uri: {report.out / 'docs.jsonl'}, "
        "format: jsonl}",
        highlight=False,
    )
