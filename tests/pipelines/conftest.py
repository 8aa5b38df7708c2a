"""Fixtures shared by the pipeline tests that train or evaluate."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import train as train_stage
from pipelines.config import PipelineConfig
from pipelines.pretokenize import stage as pretokenize
from pipelines.shard import stage as shard
from pipelines.tokenizers import stage as tokenizers_stage
from tests.pipelines.train_setup import REFERENCE, config_for, copy_workspace


@pytest.fixture(scope="session")
def tokens_workspace(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> Path:
    """Shards, quick tokenizers and token shards of the sample corpus, built once per session.

    Tests copy what they need (``copy_workspace``) or train into it with their own
    experiment names; nobody changes its tokens.
    """
    workspace = tmp_path_factory.mktemp("tokens-ws")
    config = config_for(workspace)
    shard.run(config)
    tokenizers_stage.run(config)
    pretokenize.run(config)
    return workspace


@pytest.fixture(scope="session")
def reference_run(
    tokens_workspace: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[PipelineConfig, train_stage.TrainReport]:
    """An uninterrupted two-worker run (``REFERENCE``), trained once per session: the
    losses every interrupted and recovered run must reproduce."""
    workspace = copy_workspace(tokens_workspace, tmp_path_factory.mktemp("reference"))
    config = config_for(workspace, **REFERENCE)
    return config, train_stage.run(config)
