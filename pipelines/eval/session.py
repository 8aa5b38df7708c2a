"""What the evaluations of one command share: storage, the MLflow client, the workspace's
tokenizers, each suite's samples and each training run's logged sections, loaded once."""

from __future__ import annotations

from typing import TYPE_CHECKING

from evaluation.checkpoint import (
    EvalInputError,
    LoadedCheckpoint,
    RunInfo,
    load_checkpoint,
    pick_device,
    resolve_step,
    run_info,
)
from evaluation.claims import ClaimStore
from evaluation.config import SuiteConfig
from evaluation.eval_data import load_samples
from evaluation.recognisers import Recognisers, fit_recognisers
from evaluation.tasks import TASKS
from infra.storage import Storage, is_remote, join
from infra.tracking import open_experiment
from pipelines.corpus import absolute
from tokenization.bundle import Tokenizers

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig

# The recognisers learn from the media + caption buckets' training split (text2X holds the
# same documents the other way round), at most this many samples each.
RECOGNISER_BUCKETS = ("image2text", "audio2text")
RECOGNISER_SAMPLES = 4000


class Session:
    """What evaluations of one command share: storage, MLflow client, tokenizers, samples."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.storage = Storage(config.storage)
        self.workspace = absolute(config.workspace)
        if is_remote(self.workspace):  # a long-running sweep must see new checkpoints
            fs, path = self.storage.filesystem(self.workspace)
            fs.invalidate_cache(path)
        self.client, self.experiment_id = open_experiment(config.mlflow, self.workspace)
        self._tokenizers: Tokenizers | None = None
        self._samples: dict[str, dict[str, list]] = {}
        self._runs: dict[str, RunInfo] = {}
        self._recognisers: Recognisers | None = None

    @property
    def tokenizers(self) -> Tokenizers:
        if self._tokenizers is None:
            uri = join(self.workspace, "tokenizers")
            if not self.storage.exists(join(uri, "vocab_layout.json")):
                raise EvalInputError(f"no tokenizers in {uri}: run omni tokenizers train")
            self._tokenizers = Tokenizers.load_uri(self.storage, uri)
        return self._tokenizers

    def run(self, run_id: str) -> RunInfo:
        if run_id not in self._runs:
            self._runs[run_id] = run_info(self.client, run_id)
        return self._runs[run_id]

    def samples(self, name: str, suite: SuiteConfig) -> dict[str, list]:
        """The suite's samples of every bucket its tasks read, loaded once."""
        if name not in self._samples:
            buckets = {b for task in suite.tasks for b in TASKS[task].BUCKETS}
            self._samples[name] = load_samples(
                self.storage,
                self.workspace,
                buckets,
                suite.split,
                suite.samples,
                self.tokenizers.layout,
            )
        return self._samples[name]

    def recognisers(self) -> Recognisers:
        """The judges of labelled corpora, fitted once on the training split's samples."""
        if self._recognisers is None:
            samples = load_samples(
                self.storage,
                self.workspace,
                RECOGNISER_BUCKETS,
                "train",
                RECOGNISER_SAMPLES,
                self.tokenizers.layout,
            )
            self._recognisers = fit_recognisers(self.tokenizers, samples)
        return self._recognisers

    def load(self, run_id: str, step: int | None, suite: SuiteConfig) -> LoadedCheckpoint:
        run = self.run(run_id)
        step = resolve_step(self.storage, self.workspace, run_id, step)
        return load_checkpoint(
            self.storage,
            self.workspace,
            run,
            step,
            self.tokenizers,
            pick_device(suite.device, suite.cpu_threads),
        )

    def claims(self, suite: str) -> ClaimStore:
        """The claims and done records of ``suite``: shared by ``omni eval`` and sweeps, so
        a checkpoint is evaluated once whichever command gets to it first."""
        settings = self.config.eval.sweep
        return ClaimStore(
            self.storage, self.workspace, suite, settings.lease_s, settings.max_attempts
        )


def suite_config(config: PipelineConfig, suite: str | None) -> tuple[str, SuiteConfig]:
    """The suite's name (``default`` when None) and settings; EvalInputError if unknown."""
    name = suite or "default"
    try:
        return name, config.eval.suite(name)
    except KeyError as error:
        raise EvalInputError(str(error.args[0])) from None
