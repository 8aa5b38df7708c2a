"""One claimed checkpoint, evaluated into one child MLflow run of its training run.

The child run (``mlflow.parentRunId`` = the training run; tags ``eval.checkpoint_step``,
``eval.suite``, ``eval.status``, ``eval.attempt``) receives the suite's params, metrics
and artifacts. Then the result is published through the claim store's done record, the
fence of :mod:`evaluation.claims`: only the attempt that creates it mirrors its headline
metrics into the training run (``eval/<metric>`` at the checkpoint's step) and ends its
child ``FINISHED``; an attempt that lost (its lease lapsed and a later one finished first)
ends its child ``KILLED`` with ``eval.status = SUPERSEDED`` and mirrors nothing, so no
reader of MLflow sees a checkpoint evaluated twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from evaluation.checkpoint import LoadedCheckpoint
from evaluation.claims import Claim, ClaimStore
from evaluation.config import SuiteConfig
from evaluation.recognisers import Recognisers
from evaluation.report import category_scores
from evaluation.sample_grid import render
from evaluation.tasks import TASKS, TaskContext, TaskResult
from infra.config import public_dict
from infra.tracking import Tracker
from pipelines.eval.session import Session
from pipelines.train.stage import first_line
from training.checkpointing import step_name

STAGE = "eval"
log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """One evaluated checkpoint: its child run, metrics, and which are headline."""

    run_id: str
    step: int
    suite: str
    child_run_id: str
    metrics: dict[str, float]
    headline: list[str]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    published: bool = True  # False: another attempt's done record came first


def mirrored_name(metric: str, suite: str) -> str:
    """The training run's copy of a headline metric: ``eval/<metric>`` for the default
    suite, ``eval/<suite>/<metric>`` for the others (so suites never share a curve)."""
    return f"eval/{metric}" if suite == "default" else f"eval/{suite}/{metric}"


def run_tasks(
    loaded: LoadedCheckpoint,
    suite: SuiteConfig,
    samples: dict[str, list],
    recognisers: Recognisers | None = None,
) -> TaskResult:
    """Every task of ``suite`` on one loaded checkpoint, merged into one result."""
    block = int(loaded.run.train.get("dgs_block", 32))
    context = TaskContext(loaded, suite, samples, block, recognisers)
    merged = TaskResult()
    for name in suite.tasks:
        result = TASKS[name].run(context)
        merged.metrics.update(result.metrics)
        merged.headline += result.headline
        merged.artifacts.update(result.artifacts)
        merged.notes += result.notes
        merged.examples += result.examples
    if merged.examples:
        merged.artifacts["grids/samples.png"] = render(merged.examples)
    scores = category_scores(merged.metrics)
    merged.metrics.update(scores)
    merged.headline = [*scores, *merged.headline]
    return merged


def evaluate_claimed(session: Session, store: ClaimStore, claim: Claim, suite: str) -> EvalResult:
    """Evaluate the checkpoint of ``claim`` with ``suite`` into a child run and publish it;
    ``published`` is False when another attempt's result was published first. An error
    ends the child ``FAILED`` with its first line and propagates."""
    started = time.time()
    settings = session.config.eval.suite(suite)
    loaded = session.load(claim.run_id, claim.step, settings)
    samples = session.samples(suite, settings)
    client = session.client
    tags = {
        "mlflow.parentRunId": claim.run_id,
        "omni.stage": STAGE,
        "eval.checkpoint_step": str(loaded.step),
        "eval.suite": suite,
        "eval.status": "RUNNING",
        "eval.attempt": str(claim.attempt),
        "eval.checkpoint": loaded.uri,
    }
    child = client.create_run(
        loaded.run.experiment_id, run_name=f"eval-{suite}-{step_name(loaded.step)}", tags=tags
    )
    child_id = child.info.run_id
    tracker = Tracker(client, child_id)
    try:
        tracker.log_params(public_dict(settings), prefix="eval.")
        result = run_tasks(loaded, settings, samples, session.recognisers())
        tracker.log_metrics(result.metrics, step=loaded.step)
        for name, data in sorted(result.artifacts.items()):
            folder, _, file = name.rpartition("/")
            tracker.log_bytes(data, file, folder or None)
        if result.notes:
            tracker.log_bytes("\n".join(result.notes).encode(), "notes.txt")
    except BaseException as error:
        tracker.set_tags({"eval.status": "FAILED", "error": first_line(error)[:5000]})
        client.set_terminated(child_id, "FAILED")
        raise
    headline = [m for m in result.headline if m in result.metrics]
    seconds = round(time.time() - started, 2)
    outcome = EvalResult(
        claim.run_id, loaded.step, suite, child_id, result.metrics, headline, result.notes, seconds
    )
    record = {
        "status": "finished",
        "suite": suite,
        "child_run_id": child_id,
        "metrics": result.metrics,
        "headline": headline,
        "seconds": seconds,
    }
    if not store.finish(claim.run_id, claim.step, record, claim):
        log.warning(
            "run %s %s: attempt %d finished after another attempt published; discarded",
            claim.run_id,
            step_name(claim.step),
            claim.attempt,
        )
        tracker.set_tags({"eval.status": "SUPERSEDED"})
        client.set_terminated(child_id, "KILLED")
        outcome.published = False
        return outcome
    Tracker(client, claim.run_id).log_metrics(
        {mirrored_name(m, suite): result.metrics[m] for m in headline}, step=loaded.step
    )
    tracker.set_tags({"eval.status": "FINISHED"})
    client.set_terminated(child_id, "FINISHED")
    return outcome
