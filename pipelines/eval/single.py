"""``omni eval``: one checkpoint, under the same claim and done record as the sweeps.

A checkpoint that ``omni eval`` evaluated is done for every later sweep, and one that a
sweep already evaluated is not evaluated again: its recorded result is shown instead
(the child run it names holds the details). A checkpoint a sweep is evaluating right now
is refused in one line; one whose attempts all failed raises the recorded errors.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from evaluation.checkpoint import EvalInputError, resolve_step
from evaluation.errors import EvaluationFailed
from pipelines.eval.child_run import EvalResult
from pipelines.eval.exactly_once import check_evaluable, evaluate_exactly_once
from pipelines.eval.session import Session, suite_config
from training.checkpointing import step_name

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig


def recorded_result(record: dict[str, Any], suite: str) -> EvalResult:
    """The result a finished done record holds, with a note saying when and where."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["finished_at"]))
    child = record.get("child_run_id", "?")
    return EvalResult(
        record["run_id"],
        int(record["step"]),
        suite,
        child,
        record.get("metrics", {}),
        record.get("headline", []),
        [f"already evaluated at {when} (child run {child}); shown from its done record"],
        float(record.get("seconds", 0.0)),
    )


def evaluate(
    config: PipelineConfig, run_id: str, step: int | None = None, suite: str | None = None
) -> EvalResult:
    """Evaluate one checkpoint (the latest complete one by default) exactly once."""
    name, _ = suite_config(config, suite)
    session = Session(config)
    session.run(run_id)
    step = resolve_step(session.storage, session.workspace, run_id, step)
    check_evaluable(session, run_id, step)
    store = session.claims(name)
    outcome = evaluate_exactly_once(session, store, run_id, step, name)
    where = f"run {run_id} {step_name(step)} (suite {name})"
    if outcome.status == "finished" and outcome.result is not None:
        return outcome.result
    record = outcome.record or {}
    if outcome.status == "held":
        until = time.strftime("%H:%M:%S UTC", time.gmtime(record.get("lease_until", 0)))
        raise EvalInputError(
            f"{where} is being evaluated by {record.get('owner', 'another sweep')} "
            f"(lease until {until}); its result will be in MLflow"
        )
    if outcome.status == "pruned":
        raise EvalInputError(f"{where}: the checkpoint was pruned by training meanwhile")
    if record.get("status") == "finished":
        return recorded_result(record, name)
    errors = record.get("errors") or ["unknown error"]
    raise EvaluationFailed(
        f"{where}: evaluation failed after {len(errors)} attempt(s): {errors[-1]}"
    )
