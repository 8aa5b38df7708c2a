"""Child runs left ``RUNNING`` by evaluating processes that died: ended, with the reason.

A sweep killed mid-evaluation (SIGKILL, a lost node) cannot end its child MLflow run, and
MLflow never will. Once its attempt's lease has lapsed (by the claim store's clock, so a
live owner is never judged dead), such a child run is settled here:

* the child a published result names (its publisher died while completing it) is
  completed (:func:`~pipelines.eval.publication.complete`): mirrored, ``FINISHED``, done;
* any other is ended ``KILLED`` with ``eval.status = KILLED`` and the reason in
  ``eval.killed_reason``: its attempt's result was never published, and another attempt
  evaluates (or evaluated) the checkpoint.

One MLflow search per call: a sweep pays it once, ``omni eval`` once per takeover.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from evaluation.claims import ClaimStore
from pipelines.eval import publication
from training.checkpointing import step_name

log = logging.getLogger(__name__)


@dataclass
class Settled:
    """What :func:`end_stale_children` did: one note per child run completed or killed."""

    completed: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return self.completed + self.killed


def running_children(
    client: Any, experiment_ids: Iterable[str], suite: str, run_id: str | None = None,
    step: int | None = None,
) -> list[Any]:  # fmt: skip
    """The RUNNING eval child runs of ``suite`` (of one training run and step if given)."""
    query = (
        f"tags.`omni.stage` = 'eval' and tags.`eval.suite` = '{suite}' "
        "and attributes.status = 'RUNNING'"
    )
    if run_id is not None:
        query += f" and tags.`mlflow.parentRunId` = '{run_id}'"
    if step is not None:
        query += f" and tags.`eval.checkpoint_step` = '{step}'"
    found, token = [], None
    while True:
        page = client.search_runs(list(experiment_ids), query, max_results=1000, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def end_stale_children(
    client: Any,
    store: ClaimStore,
    suite: str,
    experiment_ids: Iterable[str],
    run_ids: Collection[str],
    step: int | None = None,
) -> Settled:
    """Settle every RUNNING child run of ``suite`` under ``run_ids`` (at ``step`` if given)
    whose attempt's lease lapsed."""
    settled = Settled()
    experiments = sorted(set(experiment_ids))
    if not experiments:
        return settled
    only = next(iter(run_ids)) if len(run_ids) == 1 else None
    for child in running_children(client, experiments, suite, only, step):
        tags = child.data.tags
        parent = tags.get("mlflow.parentRunId")
        if parent not in run_ids or "eval.attempt" not in tags:
            continue
        at, attempt = int(tags["eval.checkpoint_step"]), int(tags["eval.attempt"])
        if not store.attempt_lapsed(parent, at, attempt):
            continue  # its owner is alive
        child_id, where = child.info.run_id, f"run {parent} {step_name(at)}"
        record = store.done(parent, at) or store.published(parent, at)
        if record is not None and record.get("child_run_id") == child_id:
            publication.complete(client, store, record)
            settled.completed.append(f"{where}: completed child run {child_id} (its sweep died)")
            continue
        reason = (
            f"attempt {attempt} stopped renewing its lease (its process died or stalled); "
            "its result was never published"
        )
        client.set_tag(child_id, "eval.status", "KILLED")
        client.set_tag(child_id, publication.KILLED_REASON, reason)
        client.set_terminated(child_id, "KILLED")
        log.warning("%s: child run %s ended KILLED: %s", where, child_id, reason)
        settled.killed.append(f"{where}: child run {child_id} ended KILLED ({reason})")
    return settled
