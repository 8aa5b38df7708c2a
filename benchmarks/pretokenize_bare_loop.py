"""The bare baseline of ``pretokenize_throughput.py``: the loop a user would write by hand.

One process, no Ray, one torch thread: load the tokenizers once, run ``process_shard`` on
every input shard in order with the stage's own settings (staging its samples; the
stage's packing into full tars is not part of this loop), print the timings as JSON. It
imports only what that loop needs, so its start-up is the same cold start an actor pays.

    python benchmarks/pretokenize_bare_loop.py CONFIG_JSON
"""

from __future__ import annotations

import json
import sys
import time

import torch

from infra.config import validate
from infra.storage import Storage
from pipelines.config import PipelineConfig
from pipelines.pretokenize.stage import _settings
from pipelines.pretokenize.worker import process_shard
from pipelines.stage_state import read_parquet
from pipelines.tokenizers import stage as tokenizers_stage


def main(config_json: str) -> None:
    torch.set_num_threads(1)
    config = validate(PipelineConfig, json.loads(config_json))
    tokenizers = tokenizers_stage.load_tokenizers(config)
    loaded = time.perf_counter()
    storage = Storage(config.storage)
    settings = _settings(config, storage, config.workspace)
    manifest = read_parquet(storage, f"{settings.shards_dir}/manifest.parquet")
    samples = 0
    for part in sorted(manifest["path"].to_pylist()):
        result = process_shard(part, tokenizers, settings)
        samples += sum(t["samples"] for t in result["staged"])
    print(json.dumps({"samples": samples, "loop_seconds": time.perf_counter() - loaded}))


if __name__ == "__main__":
    main(sys.argv[1])
