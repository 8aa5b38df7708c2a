"""MLflow section of a pipeline config."""

from __future__ import annotations

from pydantic import Field

from infra.config import Section


class MlflowConfig(Section):
    """Where runs are tracked. ``tracking_uri: null`` keeps a local store in the workspace."""

    tracking_uri: str | None = Field(None, description="http://HOST:5000, sqlite:///..., null")
    experiment: str = Field("omni", min_length=1)
