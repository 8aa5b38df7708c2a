"""The training stage's fingerprints, in a module light enough for planning.

``omni train`` writes :func:`expected_fingerprint` into its ``_SUCCESS.json``, and
``omni run`` computes the same function to decide whether training is up to date; one
formula, so the two cannot drift. Nothing here imports torch, DeepSpeed or MLflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from infra.config import fingerprint, public_dict

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig

STAGE = "train"


def train_sections(config: PipelineConfig) -> dict[str, Any]:
    """The config the training depends on (logged with the run, part of its fingerprint)."""
    return {"model": public_dict(config.model), "train": public_dict(config.train)}


def data_fingerprint(tokens_fingerprint: str, manifest: list[dict[str, Any]]) -> str:
    """The token data: the pretokenize stage's fingerprint and its manifest's rows."""
    return fingerprint(tokens_fingerprint, manifest)


def expected_fingerprint(config: PipelineConfig, data: str) -> str:
    """The fingerprint of training ``config`` on the token data ``data``."""
    return fingerprint(STAGE, train_sections(config), data)
