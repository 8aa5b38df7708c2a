"""The pipeline config: one YAML file, one section per stage (see ARCHITECTURE.md).

The top-level keys are fixed so a config written for one version keeps working. Each
section's model lives in the light ``config`` module of its stage (``pipelines/<stage>/
config.py``, which may take it from the library package below); this module only
assembles them. Nothing here imports torch, transformers, DeepSpeed or Ray, so loading a
config (``--help``, ``omni status``, validation) takes a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import Field

from infra.config import Section, load
from infra.ray_runtime import RayConfig
from infra.storage import StorageConfig
from infra.tracking import MlflowConfig
from pipelines.corpus import CorpusConfig
from pipelines.eval.config import EvalConfig
from pipelines.pretokenize.config import PretokenizeConfig
from pipelines.shard.config import ShardConfig
from pipelines.tokenizers.config import TokenizersConfig
from pipelines.train.config import ModelSection, TrainConfig
from pipelines.workflow.config import SubmitConfig, WorkflowConfig


class PipelineConfig(Section):
    """A whole pipeline: where it works, what it reads, and each stage's settings."""

    workspace: str = Field("./work", min_length=1, description="local folder or s3://bucket/prefix")
    corpus: CorpusConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    tokenizers: TokenizersConfig = Field(default_factory=TokenizersConfig)
    pretokenize: PretokenizeConfig = Field(default_factory=PretokenizeConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    workflow: WorkflowConfig = Field(default_factory=WorkflowConfig)
    submit: SubmitConfig = Field(default_factory=SubmitConfig)


def load_pipeline_config(path: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Load and validate a pipeline YAML with ``--set key.path=value`` overrides applied."""
    return load(PipelineConfig, path, overrides)
