"""``omni status``: where each stage of a pipeline stands, from the workspace alone.

A stage is *done* when its ``_SUCCESS.json`` matches what the config asks for now (the
workflow's plan decides, so status and ``omni run`` never disagree), *running* or
*failed* as its last workflow attempt (``<workspace>/workflow/<stage>.json``) says, and
*pending* otherwise. Given a Ray dashboard address, the Ray Jobs of the workspace add
their job ids and states: a job that ended while its record still says running was
killed with it, and is shown as failed with the job's reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from infra.storage import Storage
from pipelines.corpus import absolute
from pipelines.workflow.run import Stage, StagePlan, plan, read_markers, read_state

if TYPE_CHECKING:
    from ray.job_submission import JobDetails

    from pipelines.config import PipelineConfig


@dataclass
class StageStatus:
    """One row of ``omni status``."""

    stage: str
    state: str  # done, running, failed, pending
    produced: str = ""
    seconds: float | None = None
    mlflow_run_id: str | None = None
    ray_job_id: str | None = None
    ray_job_status: str | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _state(step: StagePlan, record: dict | None) -> tuple[str, str]:
    last = (record or {}).get("state")
    if step.action == "skip":
        return "done", ""
    if last == "running":
        return "running", ""
    if last == "failed":
        return "failed", record.get("error", "") if record else ""
    return "pending", step.reason


def stage_statuses(
    config: PipelineConfig,
    stages: list[Stage],
    jobs: list[JobDetails] | None = None,
) -> list[StageStatus]:
    """A row per stage; ``jobs`` are the cluster's Ray Jobs (None: no address given)."""
    storage = Storage(config.storage)
    workspace = absolute(config.workspace)
    plans = {p.stage: p for p in plan(config, stages, storage)}
    markers = read_markers(config, stages, storage)
    ours = [j for j in jobs or [] if (j.metadata or {}).get("omni.workspace") == workspace]
    rows = []
    for stage in stages:
        marker = markers[stage.name]
        record = read_state(storage, workspace, stage.name)
        state, reason = _state(plans[stage.name], record)
        row = StageStatus(stage.name, state, reason=reason)
        if marker:
            row.produced = stage.describe(marker, None)
            row.seconds = marker.get("seconds")
            row.mlflow_run_id = marker.get("run_id")
        elif record:
            row.seconds = record.get("seconds")
        job = _job_for(stage.name, record, ours)
        if job is not None:
            row.ray_job_id, row.ray_job_status = job.submission_id, str(job.status)
            if row.state == "running" and row.ray_job_status in ("FAILED", "STOPPED"):
                row.state, row.reason = "failed", (job.message or "").strip().split("\n")[0]
        rows.append(row)
    return rows


def _job_for(stage: str, record: dict | None, jobs: list[JobDetails]) -> JobDetails | None:
    """The stage's latest job: the one its last attempt ran in, else the latest submitted
    for the stage (or the whole workflow)."""
    recorded = (record or {}).get("submission_id")
    by_id = {j.submission_id: j for j in jobs}
    if recorded in by_id:
        return by_id[recorded]
    mine = [j for j in jobs if (j.metadata or {}).get("omni.stage") in (stage, "run")]
    return max(mine, key=lambda j: j.start_time or 0, default=None)
