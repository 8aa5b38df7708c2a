"""``omni run``: the stage DAG, run in order, each stage skipped when already done.

Ray Workflows left Ray after 2.47, so the pipeline sequences its own stages; the pattern
is make's: a stage is up to date when its ``_SUCCESS.json`` fingerprint equals the one its
config section and its upstream markers give now, and a stage that runs makes every stage
below it run. The plan is computed before anything runs (``--dry-run`` prints it). A
failing stage is retried only when the *class* of its error is transient (a reset
connection, an S3 5xx, a dead Ray actor or node); user errors fail at once. Each attempt is
recorded in ``<workspace>/workflow/<stage>.json``, which ``omni status`` reads. Stages are
injected (:class:`Stage`), so this module knows no stage and its tests need no Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infra.config import ConfigError
from infra.storage import TRANSIENT_ERRORS, Storage, join
from pipelines.corpus import absolute
from pipelines.stage_state import RUNNING, SUCCESS, read_marker, write_marker

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig

STATE_DIR = "workflow"
SUBMISSION_ENV = "OMNI_SUBMISSION_ID"  # set by ``omni submit`` in the job's environment


Markers = dict[str, dict[str, Any] | None]


@dataclass(frozen=True)
class Stage:
    """One node of the DAG.

    ``directory``: the stage's folder under the workspace (its markers live there), or
    None for a stage without markers (then the workflow's record of its last successful
    attempt, with the fingerprint, stands for ``_SUCCESS.json``). ``fingerprint``:
    the fingerprint the stage would write now, given the upstream ``_SUCCESS.json``
    payloads, or None when an input is missing. ``describe``: one line on what was
    produced, from the ``_SUCCESS.json`` payload and this run's report (either may be
    None). ``available``: why the stage's code cannot run here (not built yet), or None.
    ``user_errors``: the stage's own error classes that no retry can fix, besides
    :data:`USER_ERRORS` (a callable, so the stage module is imported only on failure).
    ``uses_ray``: the stage runs Ray work (it then shares the workflow's Ray session).
    """

    name: str
    upstream: tuple[str, ...]
    run: Callable[[PipelineConfig], Any]
    directory: str | None = None
    fingerprint: Callable[[PipelineConfig, Storage, Markers], str | None] | None = None
    describe: Callable[[dict[str, Any] | None, Any], str] = lambda marker, report: ""
    available: Callable[[], str | None] = lambda: None  # why the stage cannot run, or None
    user_errors: Callable[[], tuple[type[BaseException], ...]] = tuple
    uses_ray: bool = False


@dataclass
class StagePlan:
    """What ``omni run`` will do with one stage, and why."""

    stage: str
    action: str  # run, skip, pending (its code is not available) or unselected
    reason: str
    fingerprint: str | None = None


@dataclass
class StageOutcome:
    """How one stage ended in this invocation."""

    stage: str
    status: str  # done, skipped, failed, pending, unselected, not run
    reason: str = ""
    attempts: int = 0
    seconds: float = 0.0
    produced: str = ""
    report: Any = None
    error: BaseException | None = None
    transient: bool = False


@dataclass
class WorkflowReport:
    """Every stage's outcome, in DAG order, and the markers as they are at the end."""

    workspace: str
    plans: list[StagePlan]
    outcomes: list[StageOutcome]
    markers: Markers = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> StageOutcome | None:
        return next((o for o in self.outcomes if o.status == "failed"), None)


# ------------------------------------------------------------------ errors


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, PermissionError)


def _ray_errors() -> tuple[type[BaseException], ...]:
    from ray import exceptions

    return (
        exceptions.RayActorError,  # ActorDiedError is one
        exceptions.NodeDiedError,
        exceptions.WorkerCrashedError,
        exceptions.RaySystemError,
        exceptions.ObjectLostError,
    )


def _is_server_error(error: BaseException) -> bool:
    """An S3 (botocore) error answered with HTTP 5xx: the service, not the request, failed."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return False
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return isinstance(status, int) and status >= 500


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and what caused it: ``raise ... from``, implicit context, Ray's ``cause``."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not e for e in seen):
        seen.append(current)
        ray_cause = getattr(current, "cause", None)
        current = (
            current.__cause__
            or (ray_cause if isinstance(ray_cause, BaseException) else None)
            or (None if current.__suppress_context__ else current.__context__)
        )
    return seen


def is_transient(error: BaseException, user_errors: tuple[type[BaseException], ...] = ()) -> bool:
    """True when retrying may help: decided by the error's class, never its message.

    A user error (bad config, missing input) on the outside is final even if it wraps
    something else; otherwise any transient error in the cause chain makes it transient,
    so a ``StorageError`` raised after the storage layer's own retries ran out on a reset
    connection is retried at the stage level.
    """
    if isinstance(error, (*USER_ERRORS, *user_errors)):
        return False
    transient = (*TRANSIENT_ERRORS, *_ray_errors())
    return any(isinstance(e, transient) or _is_server_error(e) for e in _chain(error))


def first_line(error: BaseException) -> str:
    """The error's own one-line message (Ray's wrapped tracebacks end with it)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text if text else type(error).__name__


# ------------------------------------------------------------------ plan


def select(stages: Sequence[Stage], start: str | None, only: str | None) -> list[str]:
    """Names of the stages ``--from`` / ``--only`` select, in DAG order."""
    names = [s.name for s in stages]
    for option, value in (("--from", start), ("--only", only)):
        if value is not None and value not in names:
            raise ConfigError(f"{option} {value}: no such stage; stages: {', '.join(names)}")
    if start and only:
        raise ConfigError("--from and --only exclude each other")
    if only:
        return [only]
    return names[names.index(start) :] if start else names


def read_markers(config: PipelineConfig, stages: Sequence[Stage], storage: Storage) -> Markers:
    """The ``_SUCCESS.json`` payload of every stage with a directory (None when absent)."""
    workspace = absolute(config.workspace)
    return {
        s.name: read_marker(storage, join(workspace, s.directory), SUCCESS) if s.directory else None
        for s in stages
    }


def plan(
    config: PipelineConfig,
    stages: Sequence[Stage],
    storage: Storage,
    start: str | None = None,
    only: str | None = None,
) -> list[StagePlan]:
    """Run or skip, and why, for every stage, from the markers as they are now."""
    selected = select(stages, start, only)
    markers = read_markers(config, stages, storage)
    workspace = absolute(config.workspace)
    runs: set[str] = set()
    plans: list[StagePlan] = []
    for stage in stages:
        if stage.name not in selected:
            state = "done" if markers[stage.name] else "not done"
            plans.append(StagePlan(stage.name, "unselected", f"not selected ({state})"))
            continue
        missing = stage.available()
        if missing:
            plans.append(StagePlan(stage.name, "pending", missing))
            continue
        plans.append(_plan_stage(config, stage, storage, markers, runs, workspace))
        if plans[-1].action == "run":
            runs.add(stage.name)
    return plans


def _plan_stage(
    config: PipelineConfig,
    stage: Stage,
    storage: Storage,
    markers: Markers,
    runs: set[str],
    workspace: str,
) -> StagePlan:
    upstream_runs = [name for name in stage.upstream if name in runs]
    if upstream_runs:
        return StagePlan(stage.name, "run", f"upstream {', '.join(upstream_runs)} runs first")
    if stage.fingerprint is None:
        return StagePlan(stage.name, "run", "always runs; it skips what it already did")
    expected = stage.fingerprint(config, storage, markers)
    if expected is None:
        return StagePlan(stage.name, "run", "its inputs are not ready (the stage will say which)")
    if stage.directory is None:  # no marker of its own: the workflow's record stands for one
        record = read_state(storage, workspace, stage.name) or {}
        done = record if record.get("state") == "done" else None
    else:
        done = markers[stage.name]
    if done and done.get("fingerprint") == expected:
        return StagePlan(stage.name, "skip", f"done with fingerprint {expected}", expected)
    if done:
        reason = f"config or inputs changed (done with {done.get('fingerprint')}, now {expected})"
        return StagePlan(stage.name, "run", reason, expected)
    if stage.directory is None:
        return StagePlan(stage.name, "run", "not run yet", expected)
    running = read_marker(storage, join(workspace, stage.directory), RUNNING)
    if running and running.get("fingerprint") == expected:
        return StagePlan(stage.name, "run", "an interrupted run resumes", expected)
    return StagePlan(stage.name, "run", "no output yet", expected)


# ------------------------------------------------------------------ run


def state_uri(workspace: str, stage: str) -> str:
    """Where the workflow records a stage's last attempt (read by ``omni status``)."""
    return join(workspace, STATE_DIR, f"{stage}.json")


def read_state(storage: Storage, workspace: str, stage: str) -> dict[str, Any] | None:
    uri = state_uri(workspace, stage)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def _record(storage: Storage, workspace: str, stage: str, **state: Any) -> None:
    state["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    submission = os.environ.get(SUBMISSION_ENV)
    if submission:
        state["submission_id"] = submission
    write_marker(storage, join(workspace, STATE_DIR), f"{stage}.json", state)


def run(
    config: PipelineConfig,
    stages: Sequence[Stage],
    start: str | None = None,
    only: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    ray_session: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> WorkflowReport:
    """Run the planned stages in order; stop at the first stage that fails for good.

    ``ray_session`` (one Ray connection for every stage that uses Ray) is entered before
    the first such stage runs, so a pipeline that is all done starts nothing. Ray in one
    process does not survive being shut down and started again while threads of the
    last session remain (ray-project/ray#31145: a segfault, here at interpreter exit).
    """
    started = time.time()
    storage = Storage(config.storage)
    workspace = absolute(config.workspace)
    plans = plan(config, stages, storage, start, only)
    by_name = {s.name: s for s in stages}
    outcomes: list[StageOutcome] = []
    with contextlib.ExitStack() as resources:
        entered = False
        for step in plans:
            stage = by_name[step.stage]
            failed = any(o.status == "failed" for o in outcomes)
            if failed and step.action == "run":
                outcomes.append(StageOutcome(stage.name, "not run", "an upstream stage failed"))
                continue
            if step.action != "run":
                status = {"skip": "skipped"}.get(step.action, step.action)
                outcomes.append(StageOutcome(stage.name, status, step.reason))
                continue
            if ray_session is not None and stage.uses_ray and not entered:
                resources.enter_context(ray_session())
                entered = True
            outcomes.append(_attempt(config, stages, stage, storage, workspace, step, sleep))
    markers = read_markers(config, stages, storage)
    for outcome in outcomes:
        if outcome.status in ("done", "skipped"):
            describe = by_name[outcome.stage].describe
            outcome.produced = describe(markers.get(outcome.stage), outcome.report)
    return WorkflowReport(workspace, plans, outcomes, markers, round(time.time() - started, 1))


def _attempt(
    config: PipelineConfig,
    stages: Sequence[Stage],
    stage: Stage,
    storage: Storage,
    workspace: str,
    step: StagePlan,
    sleep: Callable[[float], None],
) -> StageOutcome:
    """Run one stage with retries on transient errors; every attempt is recorded."""
    settings = config.workflow
    delay = settings.backoff_s
    started = time.time()
    for attempt in range(1, settings.retries + 2):
        _record(storage, workspace, stage.name, state="running", attempt=attempt,
                reason=step.reason, started_at=started)  # fmt: skip
        try:
            report = stage.run(config)
        except Exception as error:
            transient = is_transient(error, stage.user_errors())
            seconds = round(time.time() - started, 1)
            _record(storage, workspace, stage.name, state="failed", attempt=attempt,
                    error=first_line(error), error_class=type(error).__name__,
                    transient=transient, seconds=seconds, started_at=started)  # fmt: skip
            if not transient or attempt > settings.retries:
                return StageOutcome(stage.name, "failed", first_line(error), attempt, seconds,
                                    error=error, transient=transient)  # fmt: skip
            sleep(delay)
            delay *= 2
            continue
        seconds = round(time.time() - started, 1)
        # Planned before its upstream ran, the fingerprint is known only now.
        done_with = step.fingerprint
        if done_with is None and stage.fingerprint is not None:
            done_with = stage.fingerprint(config, storage, read_markers(config, stages, storage))
        _record(storage, workspace, stage.name, state="done", attempt=attempt,
                seconds=seconds, started_at=started, fingerprint=done_with)  # fmt: skip
        # A stage may find it has nothing to do (another process finished it meanwhile).
        status = "skipped" if getattr(report, "skipped", False) is True else "done"
        return StageOutcome(stage.name, status, step.reason, attempt, seconds, report=report)
    raise AssertionError("unreachable")
