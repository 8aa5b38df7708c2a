"""The trainer on several ranks through the real DeepSpeed engine (gloo, no Ray): ZeRO-3
with partitioned weights, and world size against gradient accumulation.

Each run is ``tests/training/ranks.py`` in one process per rank. The bucket has two
shards of exactly one micro-batch each, one with text responses, one with image
responses: on two ranks each rank reads one shard per epoch, so one rank has no row for
the image head in any micro-batch; on one rank with accumulation 2 the same two
micro-batches make each step, in the same order, corrupted with the same draws.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import load_file

from infra.services import free_port
from infra.storage import Storage
from tests.conftest import REPO
from tests.training.ranks import LAYOUT, OWNER
from tokenization.sequences import Span, TokenSequence
from tokenization.token_samples import encode_sample, write_tar
from training.checkpointing import MODEL_DIR, step_name
from training.model import WEIGHTS_FILE
from training.run_control import ControlState, RunControl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

BOS, EOS = LAYOUT.special_id("<BOS>"), LAYOUT.special_id("<EOS>")
IMAGE = LAYOUT.offsets["image"]
STEPS = 3
TRAIN = {
    "max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 1, "num_workers": 2,
    "warmup_steps": 1, "lr": 3e-3, "checkpoint_every": STEPS, "keep_last": 1,
    "dgs_block": 4, "max_length": 64, "prefetch": 2,
}  # fmt: skip
HANG_S = 240  # a run takes ~20-40 s on two busy cores; a hang shows as this timeout
# Losses of runs that differ only in how the same sums are reduced (ranks, ZeRO stages):
# float32 rounding, a few ulps per step, compounding over the steps.
RTOL = 1e-5


def write_shard(path: Path, kind: str) -> None:
    """Two samples of bucket ``mixed``: a text instruction, then a text or image response."""
    samples = []
    for i in range(2):
        body = [20 + i] * 6 if kind == "text" else [IMAGE + 3 + i] * 6
        tokens = np.array([BOS, 10 + i, 11, *body, EOS], dtype=np.int32)
        sequence = TokenSequence(
            bucket="mixed", tokens=tokens, modality=np.zeros(len(tokens), dtype=np.uint8),
            instruction_length=3, spans=[Span("text", 0, len(tokens))],
        )  # fmt: skip
        samples.append(encode_sample(f"{kind}{i}-mixed", sequence, {"split": "train"}))
    path.write_bytes(write_tar(samples))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    folder = tmp_path_factory.mktemp("mixed")
    paths = [folder / "text.tar", folder / "image.tar"]
    write_shard(paths[0], "text")
    write_shard(paths[1], "image")
    return {"mixed": [str(p) for p in paths]}


def run_ranks(folder: Path, shards: dict[str, list[str]], **train: Any) -> dict[str, Any]:
    """Train on ``train["num_workers"]`` ranks; their metrics by step and rank reports."""
    folder.mkdir(parents=True)
    settings = {**TRAIN, **train}
    world = settings["num_workers"]
    run_dir = folder / "run"
    RunControl(Storage(), str(run_dir))._write(ControlState(OWNER, stop=False))
    spec = {"world": world, "port": free_port(), "out_dir": str(folder), "run_dir": str(run_dir),
            "train": settings, "shards": shards, "weights": dict.fromkeys(shards, 1.0),
            "record_gathers": True}  # fmt: skip
    (folder / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    logs = [(folder / f"log-{r}.txt").open("w") for r in range(world)]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.training.ranks", str(folder / "spec.json"), str(r)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for r, log in enumerate(logs)
    ]
    deadline = time.monotonic() + HANG_S
    try:
        while any(p.poll() is None for p in ranks):
            if time.monotonic() > deadline:
                tail = (folder / "log-0.txt").read_text()[-2000:]
                pytest.fail(f"{world} ranks did not finish {STEPS} steps in {HANG_S} s:\n{tail}")
            if any(p.poll() not in (None, 0) for p in ranks):
                break  # one failed: the others may wait for it forever
            time.sleep(0.2)
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
            process.wait()
        for log in logs:
            log.close()
    failed = [r for r, p in enumerate(ranks) if p.returncode != 0]
    # The rank that failed first, not one killed (-9) because it waited for it.
    first = sorted(failed, key=lambda r: ranks[r].returncode == -9)
    assert not failed, (folder / f"log-{first[0]}.txt").read_text()[-3000:]
    metrics = json.loads((folder / "metrics.json").read_text())
    return {
        "losses": [metrics["steps"][str(s)]["train/loss"] for s in range(1, STEPS + 1)],
        "metrics": metrics["steps"],
        "ranks": [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(world)],
        "weights": load_file(run_dir / step_name(STEPS) / MODEL_DIR / WEIGHTS_FILE),
    }


@pytest.fixture(scope="module")
def paired_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Bucket ``image2text``, two shards of two samples: an image alone, then its caption
    (the first two captions alike, so the alignment term sees a duplicate positive)."""
    folder = tmp_path_factory.mktemp("paired")
    boi, eoi = LAYOUT.special_id("<BOI>"), LAYOUT.special_id("<EOI>")
    paths = []
    for shard in range(2):
        samples = []
        for i in range(2):
            k = 2 * shard + i
            caption = [20, 21] if k < 2 else [22 + k, 21]
            tokens = np.array([BOS, boi, *[IMAGE + k] * 4, eoi, *caption, EOS], dtype=np.int32)
            sequence = TokenSequence(
                bucket="image2text", tokens=tokens, instruction_length=7,
                modality=np.zeros(len(tokens), dtype=np.uint8),
                spans=[Span("text", 0, len(tokens))],
            )  # fmt: skip
            samples.append(encode_sample(f"pair{k}-image2text", sequence, {"split": "train"}))
        paths.append(folder / f"pairs-{shard}.tar")
        paths[-1].write_bytes(write_tar(samples))
    return {"image2text": [str(p) for p in paths]}


def test_alignment_term_is_the_same_over_two_ranks_or_two_accumulated_micro_batches(
    tmp_path: Path, paired_shards: dict[str, list[str]]
) -> None:
    """The <EOS> InfoNCE runs inside the engine's forward on every rank, counts its pairs
    in the window like a token term, and enters train/loss at its fixed weight."""
    two = run_ranks(tmp_path / "two", paired_shards, alignment_weight=0.5, zero_stage=2)
    one = run_ranks(tmp_path / "one", paired_shards, alignment_weight=0.5, num_workers=1,
                    grad_accum=2)  # fmt: skip
    np.testing.assert_allclose(one["losses"], two["losses"], rtol=RTOL)
    for step in range(1, STEPS + 1):
        metrics = two["metrics"][str(step)]
        assert metrics["train/loss_align"] == pytest.approx(
            one["metrics"][str(step)]["train/loss_align"], rel=RTOL
        )
        assert 0 < metrics["train/loss_align"] < 2 * np.log(4)
        terms = [t for t in ("ce", "rec_image", "rec_audio") if f"train/loss_{t}" in metrics]
        balanced = sum(metrics[f"gradnorm/weight_{t}"] * metrics[f"train/loss_{t}"] for t in terms)
        assert metrics["train/loss"] == pytest.approx(
            balanced + 0.5 * metrics["train/loss_align"], rel=1e-6
        )
    assert "gradnorm/weight_align" not in two["metrics"]["1"]
    # ZeRO-2 checkpoints carry none of DeepSpeed's unpickling recovery scripts.
    assert not list((tmp_path / "two").rglob("zero_to_*.py"))


@pytest.fixture(scope="module")
def zero2(tmp_path_factory: pytest.TempPathFactory, shards: dict[str, list[str]]) -> dict:
    return run_ranks(tmp_path_factory.mktemp("zero2") / "run", shards, zero_stage=2)


def zero3_template(folder: Path) -> Path:
    """The shipped ZeRO-3 JSON with every parameter partitioned (``tiny``'s are all under
    the shipped persistence threshold, which would keep them whole on every rank)."""
    shipped = json.loads((REPO / "infra" / "deploy" / "deepspeed" / "zero3.json").read_text())
    shipped["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = folder / "zero3-partitioned.json"
    path.write_text(json.dumps(shipped))
    return path


def test_zero3_with_partitioned_weights_and_a_head_one_rank_lacks(
    tmp_path: Path, shards: dict[str, list[str]], zero2: dict
) -> None:
    """Both ranks run every head's gather and GradNorm's in step, rows or none: no hang,
    the losses of ZeRO-2, and a consolidated save that gathers one module at a time."""
    template = zero3_template(tmp_path)
    zero3 = run_ranks(tmp_path / "zero3", shards, zero_stage=3,
                      deepspeed_template=str(template))  # fmt: skip
    for rank in zero3["ranks"]:
        assert rank["zero_stage"] == 3
        # Really partitioned: every parameter, each rank holding about half of the elements.
        assert rank["partitioned"] == rank["params"]
        assert rank["local_elements"] <= rank["total_elements"] // 2 + rank["params"]
    # One rank scored image tokens, the other none (its micro-batches are all text).
    assert all(m["train/loss_rec_image"] > 0 for m in zero3["metrics"].values())
    np.testing.assert_allclose(zero3["losses"], zero2["losses"], rtol=RTOL)
    # The consolidated weights: equal to ZeRO-2's up to a small share of one AdamW update
    # (lr 3e-3 a step; where a gradient is ~0, rounding can flip an update's sign).
    assert zero3["weights"].keys() == zero2["weights"].keys()
    for name, tensor in zero2["weights"].items():
        np.testing.assert_allclose(zero3["weights"][name].numpy(), tensor.numpy(),
                                   rtol=0, atol=1e-4, err_msg=name)  # fmt: skip
    # The consolidated save held one module's weights at a time, never the whole model.
    largest = max(rank["largest_gather"] for rank in zero3["ranks"])
    assert largest == zero3["ranks"][0]["largest_module"]
    assert largest < zero3["ranks"][0]["total_elements"] / 2


def test_two_ranks_equal_one_rank_accumulating_two(
    tmp_path: Path, shards: dict[str, list[str]], zero2: dict
) -> None:
    """The same global batch, spread over 2 ranks or accumulated on 1, gives the same
    step: window normalisation, DeepSpeed's averaging and clipping, GradNorm's sums."""
    one = run_ranks(tmp_path / "one", shards, num_workers=1, grad_accum=2)
    assert one["ranks"][0]["zero_stage"] == 0  # one rank: DeepSpeed at stage 0, the trainer
    assert all("train/grad_norm" in m for m in one["metrics"].values())  # clips, logs the norm
    np.testing.assert_allclose(one["losses"], zero2["losses"], rtol=RTOL)
    for key in ("train/loss_ce", "train/loss_rec_image", "gradnorm/weight_ce"):
        got = [one["metrics"][str(s)][key] for s in range(1, STEPS + 1)]
        want = [zero2["metrics"][str(s)][key] for s in range(1, STEPS + 1)]
        np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=key)
