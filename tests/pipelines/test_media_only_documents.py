"""Media-only documents (empty captions) from ``omni shard`` through ``omni pretokenize``."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipelines.pretokenize import stage as pretokenize
from pipelines.shard import stage as shard
from tests import builders
from tests.conftest import SAMPLE_CORPUS, pipeline_config
from tests.pipelines.train_setup import QUICK_TOKENIZERS, use_tokenizers

pytestmark = pytest.mark.integration


def test_an_img2dataset_tar_with_a_third_empty_captions_keeps_every_sample(
    tokens_workspace: Path, tmp_path: Path
) -> None:
    """Media-only samples are sharded with their own signature, then pretokenized into the
    ``interleaved`` bucket (instruction ``<BOS>``, response the wrapped media), the only
    bucket a document of one medium and no text gives."""
    samples = builders.webdataset_samples(SAMPLE_CORPUS)
    media_only = builders.blank_every_third_caption(samples)
    builders.build_tar(tmp_path / "00000.tar", builders.tar_members(samples))
    inputs = [{"uri": str(tmp_path / "00000.tar"), "format": "webdataset"}]
    config = pipeline_config(tmp_path / "ws", inputs, tokenizers=QUICK_TOKENIZERS)

    report = shard.run(config)
    assert report.documents_out == len(samples) == 57 and report.quarantined == {}
    rows = []
    for part in sorted((tmp_path / "ws" / "shards").glob("part-*.parquet")):
        rows += pq.read_table(part, columns=["id", "native_id", "signature"]).to_pylist()
    signatures = {row["native_id"]: row["signature"] for row in rows}
    assert {key: signatures[key] for key in media_only} == media_only
    assert all("+text" in sig or sig.startswith("text+") for key, sig in signatures.items()
               if key not in media_only)  # fmt: skip

    use_tokenizers(tokens_workspace, tmp_path / "ws")  # a warm-up is not what is tested here
    tokens = pretokenize.run(config)
    assert tokens.quarantined == {} and tokens.documents == 57
    buckets = defaultdict(set)  # document id -> the buckets of its samples
    for tar in sorted((tmp_path / "ws" / "tokens").glob("*/*.tar")):
        for sample in wds.WebDataset([str(tar)], shardshuffle=False):
            meta = json.loads(sample["meta.json"])
            buckets[meta["native_id"]].add(meta["bucket"])
    for key, signature in signatures.items():
        if key in media_only:
            assert buckets[key] == {"interleaved"}, key
        else:
            kind = signature.replace("text", "").strip("+")
            assert buckets[key] == {f"{kind}2text", f"text2{kind}"}, key
