"""Completing a published evaluation: mirrored metrics, the child run ended, the done record.

A checkpoint's result lives in three stores that cannot change together: the claims'
records, the child MLflow run, and the training run's mirrored ``eval/<metric>`` points.
The attempt that wins ``result.json`` (:mod:`evaluation.claims`) then runs
:func:`complete`, whose steps are idempotent and ordered so that a done record always
names a complete result:

1. :func:`mirror`: each headline metric into the training run at the checkpoint's step,
   with the publication's own timestamp (``published_ms``), and only where the training
   run has no point at that step yet; MLflow drops an exact duplicate, so two sweeps
   completing the same result at once still leave one point;
2. :func:`end_child`: the child run ``FINISHED`` with ``eval.status = FINISHED``;
3. ``done.json``, created exclusively, last.

A sweep that finds a published result without its done record, or its child run still
``RUNNING``, after the publisher's lease lapsed, runs :func:`complete` again: whatever
point the publisher died at, the next sweep leaves one finished child run and one
mirrored value per metric.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from evaluation.claims import ClaimStore

log = logging.getLogger(__name__)

KILLED_REASON = "eval.killed_reason"


def mirrored_name(metric: str, suite: str) -> str:
    """The training run's copy of a headline metric: ``eval/<metric>`` for the default
    suite, ``eval/<suite>/<metric>`` for the others (so suites never share a curve)."""
    return f"eval/{metric}" if suite == "default" else f"eval/{suite}/{metric}"


def mirror(client: Any, record: dict[str, Any]) -> None:
    """Log the record's headline metrics into its training run at its step, once."""
    from mlflow.entities import Metric

    run_id, step, suite = record["run_id"], int(record["step"]), record["suite"]
    stamp = int(record.get("published_ms") or float(record.get("finished_at", time.time())) * 1000)
    batch = []
    for metric in record.get("headline", []):
        name = mirrored_name(metric, suite)
        if any(point.step == step for point in client.get_metric_history(run_id, name)):
            continue
        batch.append(Metric(name, float(record["metrics"][metric]), stamp, step))
    if batch:
        client.log_batch(run_id, metrics=batch)


def end_child(client: Any, record: dict[str, Any]) -> None:
    """End the record's child run FINISHED (a no-op when it is already)."""
    from mlflow.exceptions import MlflowException

    child = record["child_run_id"]
    try:
        run = client.get_run(child)
    except MlflowException as error:  # deleted by hand: nothing left to end
        log.warning("child run %s of a published evaluation is gone: %s", child, error)
        return
    if run.data.tags.get("eval.status") != "FINISHED":
        client.set_tag(child, "eval.status", "FINISHED")
    if KILLED_REASON in run.data.tags:  # a sweep took its owner for dead; it was not
        client.delete_tag(child, KILLED_REASON)
    if run.info.status != "FINISHED":
        client.set_terminated(child, "FINISHED")


def complete(client: Any, store: ClaimStore, record: dict[str, Any]) -> None:
    """Mirror, end the child run, then write the done record (see the module's steps)."""
    mirror(client, record)
    end_child(client, record)
    store.finish(record["run_id"], int(record["step"]), record)
