"""What a pretokenize worker and a pack task get besides the tokenizers.

Its own light module (no torch, no tokenizer models): Ray unpickles it in every pack task,
which must not pay the encoders' imports (8 s of CPU per worker process on two cores).
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.storage import Storage
from tokenization.sequences import SequenceConfig


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs besides the tokenizers; small and picklable."""

    storage: Storage
    shards_dir: str
    tokens_dir: str
    image_batch: int
    audio_batch: int
    samples_per_tar: int
    eval_fraction: float
    sequences: SequenceConfig
