"""The shard stage's fingerprint, in a module light enough for planning.

``omni shard`` writes :func:`expected_fingerprint` into its ``_SUCCESS.json``, and
``omni run`` / ``omni status`` compute the same function to decide whether sharding is up
to date; one formula, so the two cannot drift. Nothing here imports Ray or a media library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from infra.config import fingerprint

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig
    from pipelines.corpus import InputFile

STAGE = "shard"


def expected_fingerprint(config: PipelineConfig, files: list[InputFile]) -> str:
    """The fingerprint sharding ``files`` with ``config`` writes (``omni run`` plans with it)."""
    identity = [(f.namespace, f.format, f.size, f.version) for f in files]
    return fingerprint(STAGE, config.corpus, config.shard, identity)
