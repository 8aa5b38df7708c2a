"""``omni generate``: any-to-any from a checkpoint, one response written to a file. The
evaluation tasks generate through the same :func:`evaluation.anytoany.generate_batch`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evaluation.anytoany import (
    check_task,
    decoded_file,
    encode_input,
    generate_batch,
    instruction,
    media_tokens_for,
    without_dgs,
)
from pipelines.eval.session import Session, suite_config

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig


@dataclass
class GenerateResult:
    """What ``omni generate`` wrote, from which checkpoint, in how long."""

    run_id: str
    step: int
    kind: str
    target: str
    out: str
    seconds: float


def generate_file(
    config: PipelineConfig,
    run_id: str,
    value: str,
    target: str,
    out: str | Path,
    step: int | None = None,
    suite: str | None = None,
) -> GenerateResult:
    """``omni generate``: one response of ``target`` for a text or media file, written to
    ``out`` (UTF-8 text, PNG, or WAV), with the suite's sampler settings."""
    started = time.time()
    _, settings = suite_config(config, suite)
    session = Session(config)
    kind, local = encode_input(session.tokenizers, value)
    check_task(kind, target)
    loaded = session.load(run_id, step, settings)
    sampler = settings.sampler if settings.dgs else without_dgs(settings.sampler)
    ids = instruction(loaded.model.layout, kind, local)
    tokens = media_tokens_for(session.tokenizers, target, seconds=4.0)
    out_ids = generate_batch(loaded, [ids], target, sampler, tokens, settings.seed).responses[0]
    data = decoded_file(session.tokenizers, target, out_ids)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return GenerateResult(
        run_id, loaded.step, kind, target, str(path), round(time.time() - started, 2)
    )
