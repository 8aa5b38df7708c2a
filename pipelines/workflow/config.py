"""The ``workflow`` (``omni run``) and ``submit`` (``omni submit``) sections of the config
(light: pydantic only, no Ray)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from infra.config import Section


class TaskResources(Section):
    """What one Ray task holds while it runs (logical Ray resources)."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs the task holds")
    num_gpus: float = Field(0.0, ge=0, description="GPUs the task holds (1 = a whole GPU)")


class WorkflowConfig(Section):
    """How ``omni run`` retries a failing stage, and where its driver-side stages run."""

    retries: int = Field(2, ge=0, description="extra attempts of a stage after a transient error")
    backoff_s: float = Field(5.0, ge=0, description="wait before the first retry; doubles after")
    tokenizers: TaskResources = Field(
        default_factory=TaskResources,
        description="the tokenizer warm-up's Ray task on a cluster (ray.address set)",
    )
    eval: TaskResources = Field(
        default_factory=TaskResources,
        description="the evaluation sweep's Ray task on a cluster (ray.address set)",
    )


class RuntimeEnvSection(Section):
    """What a submitted job carries besides the project's source."""

    pip: Literal["pinned"] | list[str] | None = Field(
        "pinned",
        description="'pinned': the project's requirements at the versions installed here; "
        "a list of requirements; null: none (the cluster's image has them, needs no network)",
    )
    image_uri: str | None = Field(
        None, description="container image of the job (the requirements in it; pip not sent)"
    )
    excludes: list[str] = Field(
        default_factory=list, description="more paths of the source tree not to upload"
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="environment of the job (never put secrets here)"
    )


class SubmitConfig(Section):
    """``omni submit``: how a job is packaged and what its driver reserves."""

    runtime_env: RuntimeEnvSection = Field(default_factory=RuntimeEnvSection)
    entrypoint_num_cpus: float = Field(0, ge=0, description="CPUs reserved for the job driver")
    entrypoint_num_gpus: float = Field(0, ge=0, description="GPUs reserved for the job driver")
