"""Failures of a training run: what caused them, and each automatic recovery made visible.

Ray Train restarts the worker group after a lost worker or node, up to
``train.max_failures`` times (``FailureConfig``); the restarted workers resume from the
latest complete checkpoint by themselves (``training.train_loop``). :class:`RecoveryLog`
runs in Ray Train's controller and, for every failure Ray Train recovers from, logs
``train/restarts`` (the count, at the step the run resumes from), sets the tag
``train.restart_cause`` and prints one line, which Ray forwards to the driver's console.
A failure past the limit is left to the driver, which ends the run FAILED with
:func:`failure_cause` as its ``error`` tag.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.exceptions import RayActorError
from ray.train import UserCallback

RESTARTS = "train/restarts"
CAUSE_TAG = "train.restart_cause"


def _root(error: BaseException) -> BaseException:
    """A worker that died shows as a failed health check wrapping the actor's death."""
    return getattr(error, "health_check_failure", None) or error


def _first_line(error: BaseException) -> str:
    """The line of an error a person should read: Ray's reason for an actor's death, else
    the last line of the message (a worker's exception, under Ray's wrapping)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    reasons = [line for line in lines if "dead because" in line or "died because" in line]
    return reasons[0] if reasons else lines[-1]


def failure_cause(errors: Mapping[int, BaseException]) -> str:
    """``rank R: <error>`` for the failure that most likely caused the others.

    A dead worker or lost node comes first: when one rank dies, the others fail with
    collateral errors (a collective's connection reset) that say nothing about why.
    """
    rank, error = min(
        errors.items(), key=lambda item: (not isinstance(_root(item[1]), RayActorError), item[0])
    )
    error = _root(error)
    return f"rank {rank}: {type(error).__name__}: {_first_line(error)}"


def error_cause(error: BaseException) -> str:
    """What ended a failed ``fit()``, in one line (the driver's ``error`` tag)."""
    workers = getattr(error, "worker_failures", None)
    if workers:
        return failure_cause(workers)
    controller = getattr(error, "controller_failure", None)
    return _first_line(controller if controller is not None else error)


def _is_preemption(errors: Mapping[int, BaseException]) -> bool:
    """Ray Train's rule: a preempted node's failure has its own, unlimited, retry budget."""
    return any(isinstance(_root(e), RayActorError) and _root(e).preempted for e in errors.values())


class RecoveryLog(UserCallback):
    """Ray Train callback (runs in its controller) that records each recovery in the run.

    ``storage``: the run's ``StorageConfig`` as plain data; ``run_dir``: its checkpoints.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        max_failures: int,
        storage: dict[str, Any],
        run_dir: str,
    ) -> None:
        self.tracking_uri, self.run_id, self.max_failures = tracking_uri, run_id, max_failures
        self.storage, self.run_dir = storage, run_dir
        self.failures = self.restarts = 0

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        """One failure of the worker group, which Ray Train restarts unless it was the
        failure past ``max_failures`` (counted as Ray Train's failure policy counts)."""
        if not _is_preemption(worker_exceptions):
            self.failures += 1
            if 0 <= self.max_failures < self.failures:
                return  # not recovered: the driver records the cause
        self.restarts += 1
        cause = failure_cause(worker_exceptions)
        limit = "unlimited" if self.max_failures < 0 else str(self.max_failures)
        try:  # a callback error would fail the run it reports on
            step = self._record(cause)
        except Exception as error:
            step, cause = None, f"{cause} (not recorded in MLflow: {error})"
        where = "the start" if step is None else f"step {step}"
        print(
            f"omni train: restarting the workers from {where} (restart {self.restarts}, "
            f"train.max_failures={limit}) after {cause}",
            flush=True,
        )

    def _record(self, cause: str) -> int | None:
        """Metric and tag; returns the step the run resumes from: its latest complete
        checkpoint, as the restarted workers will find it (the ``checkpoint.latest`` tag
        can lag: a rank 0 lost between a checkpoint's marker and its tag)."""
        from mlflow import MlflowClient

        from infra.storage import Storage, StorageConfig
        from training.checkpointing import latest_complete

        storage = Storage(StorageConfig.model_validate(self.storage))
        step = latest_complete(storage, self.run_dir)
        client = MlflowClient(self.tracking_uri)
        client.log_metric(self.run_id, RESTARTS, self.restarts, step=step or 0)
        client.set_tag(self.run_id, CAUSE_TAG, f"restart {self.restarts}: {cause}"[:5000])
        return step
