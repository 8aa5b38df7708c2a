"""Token tars of a useful size: the packing plan, and the stage packing many small input
shards into tars of ``samples_per_tar``, exactly once across a kill and a rerun."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipelines.pretokenize import stage as pretokenize
from pipelines.pretokenize.packing import packing_plan
from tests.conftest import REPO
from tests.pipelines.test_pretokenize import EXPECTED, prepared, replicated


def test_the_plan_cuts_each_bucket_into_runs_of_samples_per_tar() -> None:
    staged = [
        {"bucket": "text", "path": f"_staged/text/{i:06d}.tar", "samples": n}
        for i, n in enumerate([7, 3, 0, 12, 1])
    ] + [{"bucket": "video2text", "path": "_staged/video2text/000004.tar", "samples": 2}]
    rows = packing_plan(staged, samples_per_tar=5)
    text = [r for r in rows if r["bucket"] == "text"]
    assert [r["path"] for r in text] == [f"text/{i:06d}.tar" for i in range(5)]  # ceil(23 / 5)
    sizes = [sum(stop - start for _, start, stop in r["slices"]) for r in text]
    assert sizes == [5, 5, 5, 5, 3]
    # every staged sample lands in exactly one tar, in (staged path, key) order
    copied = [(path, i) for r in text for path, a, b in r["slices"] for i in range(a, b)]
    expected = [(e["path"], i) for e in staged[:5] for i in range(e["samples"])]
    assert copied == expected
    [video] = [r for r in rows if r["bucket"] == "video2text"]
    assert video["slices"] == [["_staged/video2text/000004.tar", 0, 2]]
    assert packing_plan(staged, samples_per_tar=5) == rows  # a rerun plans the same tars


def test_the_plan_packs_each_split_into_its_own_tars() -> None:
    """Staged tars hold their splits in name order (eval, then train): each split becomes
    its own run of tars, so every rank's share of a bucket's train tars is train data."""
    staged = [
        {"bucket": "text", "path": "_staged/text/000000.tar", "samples": 6,
         "splits": {"eval": 2, "train": 4}},
        {"bucket": "text", "path": "_staged/text/000001.tar", "samples": 5,
         "splits": {"train": 5}},
    ]  # fmt: skip
    rows = packing_plan(staged, samples_per_tar=4)
    assert [(r["path"], r["split"], r["slices"]) for r in rows] == [
        ("text/eval-000000.tar", "eval", [["_staged/text/000000.tar", 0, 2]]),
        ("text/train-000000.tar", "train", [["_staged/text/000000.tar", 2, 6]]),
        ("text/train-000001.tar", "train", [["_staged/text/000001.tar", 0, 4]]),
        ("text/train-000002.tar", "train", [["_staged/text/000001.tar", 4, 5]]),
    ]
    with pytest.raises(ValueError, match="split counts"):
        packing_plan([{**staged[0], "samples": 7}], samples_per_tar=4)


def keys_per_bucket(tokens: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for tar in sorted(tokens.glob("*/*.tar")):
        samples = wds.WebDataset([str(tar)], shardshuffle=False)
        out.setdefault(tar.parent.name, []).extend(s["__key__"] for s in samples)
    return out


KILL_WHILE_PACKING = """
import sys, ray
ray.init(address="local", num_cpus=1, include_dashboard=False,
         runtime_env={"worker_process_setup_hook": "tests.pipelines.slow_packing.install"})
from pipelines.pretokenize import stage as pretokenize
from pipelines.config import load_pipeline_config
pretokenize.run(load_pipeline_config(sys.argv[1]))
"""


class StoppedAfterTokenizing(Exception):
    """Raised in place of packing: the stage stops with every shard tokenized."""


def stop_before_packing(*args: object) -> list:
    raise StoppedAfterTokenizing


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_many_small_shards_make_few_full_tars_exactly_once_across_a_kill(
    tokens_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokenize every shard (the stage stopped before packing), then SIGKILL a rerun of
    the stage while it packs, then run it again: every sample once, in
    ceil(samples / samples_per_tar) tars per bucket. (A kill while tokenizing is
    ``test_pretokenize.py``'s killed-job test, which counts the packed keys as well.)"""
    per_tar = 30
    config = prepared(
        tmp_path / "ws",
        replicated(tmp_path, 1),
        tokens_workspace,
        shard={"target_tokens": 1000},
        pretokenize={"samples_per_tar": per_tar},
    )
    shards = len(list((tmp_path / "ws" / "shards").glob("part-*.parquet")))
    assert shards >= 8  # many small input shards
    with monkeypatch.context() as patch:
        patch.setattr(
            pretokenize, "_pack", lambda *a: (_ for _ in ()).throw(StoppedAfterTokenizing)
        )
        with pytest.raises(StoppedAfterTokenizing):
            pretokenize.run(config)
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    tokens = tmp_path / "ws" / "tokens"
    assert len(list((tokens / "_done").glob("*.json"))) == shards
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    process = subprocess.Popen([sys.executable, "-c", KILL_WHILE_PACKING, str(path)], cwd=REPO,
                               env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        while len(list((tokens / "_packed").glob("*/*.json"))) < 2:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert not (tokens / "_SUCCESS.json").exists()
    packed = len(list((tokens / "_packed").glob("*/*.json")))

    report = pretokenize.run(config)
    assert report.resumed_shards == shards  # the first phase was all done
    assert 2 <= packed < report.tars  # killed half-way through packing
    expected = EXPECTED
    keys = keys_per_bucket(tokens)
    assert {bucket: len(found) for bucket, found in keys.items()} == expected
    assert all(len(set(found)) == len(found) for found in keys.values())  # each once
    manifest = pq.read_table(tokens / "manifest.parquet").to_pylist()
    runs: Counter[tuple[str, str]] = Counter()  # samples per (bucket, split)
    for entry in manifest:
        runs[(entry["bucket"], entry["split"])] += entry["samples"]
    assert {b for b, _ in runs} == set(expected) and {s for _, s in runs} == {"train", "eval"}
    assert {b: sum(n for (c, _), n in runs.items() if c == b) for b in expected} == expected
    tars = Counter((entry["bucket"], entry["split"]) for entry in manifest)
    assert dict(tars) == {run: math.ceil(n / per_tar) for run, n in runs.items()}
    assert report.tars == len(manifest) < sum(expected.values()) / per_tar + len(runs)
    for run in runs:  # one split per tar, full tars but the last of each bucket and split
        mine = [e for e in manifest if (e["bucket"], e["split"]) == run]
        assert all(e["path"].startswith(f"{run[0]}/{run[1]}-") for e in mine)
        for entry in mine:  # and each sample in it is of that split
            tar = wds.WebDataset([str(tokens / entry["path"])], shardshuffle=False)
            assert {json.loads(s["meta.json"])["split"] for s in tar} == {run[1]}
        sizes = sorted((e["samples"] for e in mine), reverse=True)
        assert sizes[:-1] == [per_tar] * (len(sizes) - 1)
    assert not any((tokens / leftover).exists() for leftover in ("_done", "_staged", "_packed"))
    stats = json.loads((tokens / "stats.json").read_text())
    assert {b: s["samples"] for b, s in stats.items()} == expected
