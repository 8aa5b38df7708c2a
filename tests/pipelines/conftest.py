"""Fixtures shared by the pipeline tests that train or evaluate."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.pretokenize import stage as pretokenize
from pipelines.shard import stage as shard
from pipelines.tokenizers import stage as tokenizers_stage
from tests.pipelines.train_setup import config_for


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
