"""What ``omni train`` reads before anything starts: token shards, layout, codebooks.

Checked in the driver, before an MLflow run or a Ray worker exists, so a missing input or
a mismatch ends in one line and leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from infra.config import ConfigError
from infra.storage import Storage, join
from pipelines.corpus import absolute
from pipelines.stage_state import SUCCESS, read_marker, read_parquet
from pipelines.train.fingerprints import data_fingerprint
from tokenization.bundle import Tokenizers

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig


class TrainInputError(RuntimeError):
    """An input of the training stage is missing or does not match (exit code 1)."""


@dataclass
class TrainInputs:
    """Token shards per bucket (URIs) for training (``shards``) and held-out loss
    (``eval_shards``), sample counts per shard, bucket weights, vocabulary and
    fingerprints. A tar of both splits (older workspaces) is in both lists."""

    shards: dict[str, list[str]]
    eval_shards: dict[str, list[str]]
    shard_samples: dict[str, int]
    weights: dict[str, float]
    layout: dict
    codebooks: dict[str, np.ndarray]
    data_fingerprint: str
    layout_fingerprint: str


def gather_inputs(config: PipelineConfig, storage: Storage) -> TrainInputs:
    """Read ``tokens/`` and ``tokenizers/`` of the workspace and check they belong together."""
    workspace = absolute(config.workspace)
    tokens_dir = join(workspace, "tokens")
    done = read_marker(storage, tokens_dir, SUCCESS)
    if done is None:
        raise TrainInputError(
            f"no token shards at {storage.describe(tokens_dir)} (no {SUCCESS}): "
            "run `omni pretokenize` first"
        )
    manifest = read_parquet(storage, join(tokens_dir, "manifest.parquet")).to_pylist()
    shards: dict[str, list[str]] = {}
    eval_shards: dict[str, list[str]] = {}
    shard_samples: dict[str, int] = {}
    for row in manifest:
        if row["samples"] > 0:
            uri = join(tokens_dir, row["path"])
            split = row.get("split")
            if split in (None, "train"):
                shards.setdefault(row["bucket"], []).append(uri)
            if split in (None, "eval"):
                eval_shards.setdefault(row["bucket"], []).append(uri)
            shard_samples[uri] = int(row["samples"])
    if not shards:
        raise TrainInputError(f"{tokens_dir}/manifest.parquet lists no token shard")
    tokenizers_dir = join(workspace, "tokenizers")
    tokenizers = Tokenizers.load_uri(storage, tokenizers_dir)
    layout = tokenizers.layout
    if done.get("layout") != layout.fingerprint():
        raise TrainInputError(
            f"the token shards were made with vocabulary layout {done.get('layout')}, the "
            f"tokenizers in {tokenizers_dir} have {layout.fingerprint()}: rerun pretokenize"
        )
    weights = config.train.bucket_weights or dict.fromkeys(sorted(shards), 1.0)
    unknown = sorted(set(weights) - set(shards))
    if unknown:
        raise ConfigError(
            f"train.bucket_weights: no token shards for bucket(s) {unknown}; "
            f"the workspace has {sorted(shards)}"
        )
    codebooks = {
        "image": tokenizers.image.codebook_vectors().detach().float().numpy(),
        "audio": tokenizers.audio.codebook_vectors().detach().float().numpy(),
    }
    return TrainInputs(
        shards={b: sorted(shards[b]) for b in weights},
        eval_shards={b: sorted(eval_shards.get(b, [])) for b in weights},
        shard_samples={uri: shard_samples[uri] for b in weights for uri in shards[b]},
        weights={b: float(w) for b, w in weights.items()},
        layout=asdict(layout),
        codebooks=codebooks,
        data_fingerprint=data_fingerprint(done["fingerprint"], manifest),
        layout_fingerprint=layout.fingerprint(),
    )
