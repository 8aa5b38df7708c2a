"""One checkpoint evaluated exactly once, whoever asks (``omni eval`` or any sweep).

Each try is an exclusive, leased claim of :mod:`evaluation.claims`, kept alive by a
heartbeat while :func:`~pipelines.eval.child_run.evaluate_claimed` runs; a failed try
records its error and the next one is claimed, up to ``eval.sweep.max_attempts``, after
which the checkpoint's done record says ``failed`` with every error. A checkpoint that
training's ``keep_last`` pruned meanwhile is recorded ``pruned``. Taking over from
attempts whose lease lapsed ends their child runs (:mod:`pipelines.eval.stale_children`);
a result published by a sweep that died before its done record is completed
(:mod:`pipelines.eval.publication`), not evaluated again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from evaluation.checkpoint import EvalInputError, run_dir
from evaluation.claims import Claim, ClaimStore, Exhausted, Published
from infra.storage import join
from pipelines.eval import publication
from pipelines.eval.child_run import EvalResult, evaluate_claimed
from pipelines.eval.session import Session
from pipelines.eval.stale_children import end_stale_children
from pipelines.train.stage import first_line
from tokenization.vocab import VocabLayout
from training.checkpointing import MODEL_DIR, complete_steps, step_name

log = logging.getLogger(__name__)

Status = Literal["finished", "repaired", "failed", "pruned", "superseded", "done", "held"]


@dataclass
class Outcome:
    """What one request for a checkpoint came to.

    ``finished``: this call evaluated and published it (``result``); ``repaired``: this
    call completed a result that a dead sweep had published (``record``); ``failed``: this call
    recorded it failed after the last attempt; ``pruned``: its checkpoint went away;
    ``superseded``: this call evaluated it, but another attempt published first;
    ``done``: it already had a done record (``record``); ``held``: another live claim
    is evaluating it now (``record`` is that attempt).
    """

    status: Status
    result: EvalResult | None = None
    record: dict[str, Any] | None = None
    note: str | None = None


def check_evaluable(session: Session, run_id: str, step: int) -> None:
    """EvalInputError if the run cannot be evaluated at all (unknown, not a training run,
    a vocabulary layout other than the workspace's tokenizers); checked before claiming,
    so bad input leaves no claim behind."""
    session.run(run_id)
    uri = join(run_dir(session.workspace, run_id), step_name(step), MODEL_DIR, "vocab_layout.json")
    try:
        data = json.loads(session.storage.read_bytes(uri))
        data.pop("fingerprint", None)
        layout = VocabLayout(**{**data, "specials": tuple(data["specials"])})
        session.tokenizers.layout.check_same(layout, f"checkpoint {step_name(step)}")
    except (ValueError, FileNotFoundError) as error:
        raise EvalInputError(str(error)) from None


def _not_ours(store: ClaimStore, run_id: str, step: int) -> Outcome:
    record = store.done(run_id, step)
    if record is not None:
        return Outcome("done", record=record)
    attempts = store.attempts(run_id, step)
    return Outcome("held", record=attempts[-1] if attempts else None)


def _end_lapsed(session: Session, store: ClaimStore, claim: Claim | Exhausted, suite: str) -> None:
    """End the RUNNING child runs of the attempts ``claim`` took over from."""
    if claim.lapsed:
        experiment = session.run(claim.run_id).experiment_id
        end_stale_children(session.client, store, suite, [experiment], {claim.run_id}, claim.step)


def evaluate_exactly_once(
    session: Session, store: ClaimStore, run_id: str, step: int, suite: str
) -> Outcome:
    """Claim and evaluate checkpoint ``step`` of ``run_id``, retrying failed tries."""
    where = f"run {run_id} {step_name(step)}"
    while True:
        claim = store.claim(run_id, step)
        if claim is None:
            return _not_ours(store, run_id, step)
        if isinstance(claim, Published):
            publication.complete(session.client, store, claim.record)
            note = (
                f"{where}: completed the result attempt {claim.record['attempt']} published "
                "(its sweep stopped before the done record)"
            )
            return Outcome("repaired", record=store.done(run_id, step), note=note)
        _end_lapsed(session, store, claim, suite)
        if isinstance(claim, Exhausted):
            record = {"status": "failed", "suite": suite, "errors": claim.errors, "metrics": {}}
            if not store.finish(run_id, step, record):
                return _not_ours(store, run_id, step)
            note = f"{where}: failed after {len(claim.errors)} attempts: {claim.errors[-1]}"
            return Outcome("failed", record=store.done(run_id, step), note=note)
        try:
            with store.heartbeat(claim):
                result = evaluate_claimed(session, store, claim, suite)
        except Exception as error:
            message = first_line(error)
            store.record_error(claim, message)
            if step not in complete_steps(session.storage, run_dir(session.workspace, run_id)):
                record = {"status": "pruned", "suite": suite, "errors": [message], "metrics": {}}
                store.finish(run_id, step, record)
                return Outcome("pruned", note=f"{where}: pruned by training")
            log.warning("evaluation of %s failed (attempt %d): %s", where, claim.attempt, message)
            continue
        if not result.published:
            note = f"{where}: attempt {claim.attempt} outlived its lease; another was published"
            return Outcome("superseded", result=result, record=store.done(run_id, step), note=note)
        return Outcome("finished", result=result, record=store.done(run_id, step))
