"""The pipeline config: one YAML file, one section per stage (see ARCHITECTURE.md).

The top-level keys are fixed so a config written for one version keeps working. Each
section's model lives next to the code that uses it; this module only assembles them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import Field

from evaluation.config import EvalConfig
from infra.config import Section, load
from infra.ray_runtime import RayConfig
from infra.storage import StorageConfig
from infra.tracking import MlflowConfig
from pipelines.corpus import CorpusConfig
from pipelines.pretokenize.stage import PretokenizeConfig
from pipelines.shard.stage import ShardConfig
from pipelines.workflow.run import WorkflowConfig
from pipelines.workflow.submit import SubmitConfig
from tokenization.config import TokenizersConfig
from training.train_config import ModelSection, TrainConfig


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
