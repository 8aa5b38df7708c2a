"""What every task receives and returns; the shared pieces of their inputs.

A task is a function ``run(context) -> TaskResult``: pure evaluation of one loaded
checkpoint on in-memory samples. Logging, claims and files are the caller's business,
so a task runs the same in ``omni eval``, a sweep, a benchmark or a unit test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from evaluation.anytoany import without_dgs
from evaluation.checkpoint import LoadedCheckpoint
from evaluation.config import SuiteConfig
from evaluation.recognisers import Recogniser, Recognisers
from evaluation.sample_grid import Example
from tokenization.token_samples import TokenSample
from training.sampling import SamplerConfig


@dataclass
class TaskContext:
    """One checkpoint, one suite, and the samples of every bucket the suite reads."""

    loaded: LoadedCheckpoint
    suite: SuiteConfig
    samples: dict[str, list[TokenSample]]
    dgs_block: int  # the block the run padded responses to (train.dgs_block)
    recognisers: Recognisers | None = None  # judges of labelled corpora (None: not fitted)

    @property
    def sampler(self) -> SamplerConfig:
        """The suite's sampler, with DGS switched off when the suite says so."""
        return self.suite.sampler if self.suite.dgs else without_dgs(self.suite.sampler)

    def recogniser(self, medium: str, result: TaskResult, what: str) -> Recogniser | None:
        """The fitted recogniser of ``medium``, or None with the reason noted in ``result``."""
        if self.recognisers is None:
            result.notes.append(f"{what}: no recognisers fitted, recognition skipped")
            return None
        judge = self.recognisers.get(medium)
        if isinstance(judge, str):
            result.notes.append(f"{what}: recognition skipped ({judge})")
            return None
        return judge


@dataclass
class TaskResult:
    """Metrics (flat names), the ones mirrored into the training run, files, notes, and
    the generated ids behind the metrics (to compare two samplers token by token)."""

    metrics: dict[str, float] = field(default_factory=dict)
    headline: list[str] = field(default_factory=list)
    artifacts: dict[str, bytes] = field(default_factory=dict)  # "folder/name" -> bytes
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)  # name -> local ids/sample
    examples: list[Example] = field(default_factory=list)  # drawn into grids/samples.png


def split_sample(sample: TokenSample) -> tuple[Tensor, Tensor]:
    """(instruction Long[n], response Long[L - n]) unified ids of a token sample."""
    n = int(sample.meta["instruction_length"])
    return sample.tokens[:n], sample.tokens[n:]


EXAMPLES = 6  # eval samples per task drawn in the sample grid


def batches(items: list, size: int) -> list[list]:
    """Consecutive chunks of ``items`` of at most ``size``."""
    return [items[start : start + size] for start in range(0, len(items), size)]
