"""The trainer's components on their own: objective, loss normalisation, GradNorm, LR
schedule, DeepSpeed config, checkpoint bookkeeping, run control, micro-batches."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.config import ConfigError, validate
from infra.storage import Storage
from tokenization.sequences import Span, TokenSequence
from tokenization.token_samples import encode_sample, write_tar
from tokenization.vocab import VocabLayout
from training.batch_source import BatchSource, BucketTooLongError, SourceSettings
from training.checkpointing import (
    COMPLETE,
    CheckpointWriter,
    complete_steps,
    rng_state,
    set_rng_state,
)
from training.deepspeed_config import deepspeed_config, trainer_clips
from training.dfm import PathConfig, build_path
from training.gradnorm import FixedWeights, GradNorm
from training.learning_rate import lr_lambda
from training.micro_batch import collate
from training.model import OmniModel
from training.model_config import load_model_config
from training.objective import Objective, window_scales
from training.run_control import RunControl
from training.train_config import TrainConfig

LAYOUT = VocabLayout(text_size=100, image_size=32, audio_size=24)
PAD = LAYOUT.special_id("<PAD>")
EOS = LAYOUT.special_id("<EOS>")
BOS = LAYOUT.special_id("<BOS>")
IMAGE = LAYOUT.offsets["image"]


def tiny_model() -> OmniModel:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    books = {
        "image": torch.randn(LAYOUT.image_size, 8, generator=gen),
        "audio": torch.randn(LAYOUT.audio_size, 6, generator=gen),
    }
    return OmniModel(load_model_config("tiny"), LAYOUT, books)


def objective(model: OmniModel, kind: str = "dfm") -> Objective:
    path = build_path(PathConfig(), LAYOUT) if kind == "dfm" else None
    return Objective(model, kind, path, "cross_entropy")


def sample(key: str, tokens: list[int], instruction: int, bucket: str = "text") -> object:
    from tokenization.token_samples import TokenSample

    ids = torch.tensor(tokens)
    meta = {"instruction_length": instruction, "bucket": bucket, "split": "train"}
    return TokenSample(key, ids, torch.zeros_like(ids, dtype=torch.uint8), meta)


# ---------------------------------------------------------------------------- micro-batches


def test_collate_pads_responses_to_the_dgs_block_and_the_batch_to_its_longest() -> None:
    batch = collate(
        [sample("a", [BOS, 5, 6, EOS], 1), sample("b", [BOS, 5, EOS], 1)], "text", PAD, 4
    )
    assert batch.ids.tolist() == [
        [BOS, 5, 6, EOS, PAD],
        [BOS, 5, EOS, PAD, PAD],
    ]
    # DGS <PAD> is real (supervised); the batch padding is not.
    assert batch.attention_mask.tolist() == [[True] * 5, [True] * 5]
    assert batch.response_mask[:, 0].tolist() == [False, False]
    unpadded = collate(
        [sample("a", [BOS, 5, 6, EOS], 1), sample("b", [BOS, EOS], 1)], "text", PAD, None
    )
    assert unpadded.attention_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert unpadded.padding_fraction == pytest.approx(2 / 8)


def write_bucket_tar(path: Path, bucket: str, count: int, length: int) -> None:
    samples = []
    for i in range(count):
        tokens = np.array([BOS] + [5 + (i % 50)] * (length - 2) + [EOS], dtype=np.int32)
        sequence = TokenSequence(
            bucket=bucket, tokens=tokens, modality=np.zeros(length, dtype=np.uint8),
            instruction_length=1, spans=[Span("text", 0, length)],
        )  # fmt: skip
        samples.append(encode_sample(f"{bucket}{i:04d}-{bucket}", sequence, {"split": "train"}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(write_tar(samples))


def test_every_micro_batch_holds_one_bucket_in_the_weighted_order(tmp_path: Path) -> None:
    shards = {}
    for bucket, length in (("text", 6), ("image2text", 9), ("audio2text", 12)):
        write_bucket_tar(tmp_path / f"{bucket}.tar", bucket, 7, length)
        shards[bucket] = [str(tmp_path / f"{bucket}.tar")]
    weights = {"text": 2.0, "image2text": 1.0, "audio2text": 1.0}
    settings = SourceSettings(shards, weights, seed=0, rank=0, world=1, micro_batch_size=3,
                              pad_id=PAD, dgs_block=None, max_length=64, prefetch=2)  # fmt: skip
    source = BatchSource(settings)
    try:
        batches = [next(source) for _ in range(40)]
    finally:
        source.close()
    for batch in batches:
        assert {key.split("-")[-1] for key in batch.keys} == {batch.bucket}
    counts = {b: sum(x.bucket == b for x in batches) for b in weights}
    assert counts == {"text": 20, "image2text": 10, "audio2text": 10}
    # the position after the last consumed batch resumes the same continuation
    resumed = BatchSource(settings, source.position)
    fresh = BatchSource(settings)
    try:
        for _ in range(40):
            next(fresh)
        assert [next(resumed).keys for _ in range(6)] == [next(fresh).keys for _ in range(6)]
    finally:
        resumed.close()
        fresh.close()


@pytest.mark.timeout(60)  # the failure this guards against is an endless loop
def test_a_bucket_with_no_sample_under_max_length_fails_naming_it(tmp_path: Path) -> None:
    write_bucket_tar(tmp_path / "text.tar", "text", 5, 6)
    write_bucket_tar(tmp_path / "a.tar", "image2text", 4, 12)
    write_bucket_tar(tmp_path / "b.tar", "image2text", 3, 12)
    shards = {"text": [str(tmp_path / "text.tar")],
              "image2text": [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]}  # fmt: skip
    settings = SourceSettings(shards, {"text": 1.0, "image2text": 1.0}, seed=0, rank=0,
                              world=1, micro_batch_size=2, pad_id=PAD, dgs_block=None,
                              max_length=10, prefetch=2)  # fmt: skip
    source = BatchSource(settings)
    try:
        with pytest.raises(BucketTooLongError, match=r"^bucket 'image2text'.*max_length=10"):
            for _ in range(10):
                next(source)
    finally:
        source.close()
    assert source.skipped()["too_long_image2text"] >= 7  # one whole epoch at least
    settings.max_length = 12  # samples that fit: no error, none skipped
    fits = BatchSource(settings)
    try:
        assert {next(fits).bucket for _ in range(4)} == {"text", "image2text"}
    finally:
        fits.close()
    assert not fits.skipped()


# ---------------------------------------------------------------------------- objective


def test_dfm_objective_scores_exactly_the_masked_response_positions() -> None:
    model = tiny_model()
    obj = objective(model)
    tokens = [BOS, 5, 6, IMAGE + 1, IMAGE + 2, 7, EOS]
    batch = collate([sample("a", tokens, 2)], "text", PAD, None)
    prepared = obj.prepare(batch, torch.Generator().manual_seed(3))
    mask_id = LAYOUT.special_id("<MASK>")
    masked = prepared.inputs == mask_id
    assert torch.equal(prepared.scored, masked)
    assert not bool(masked[:, :2].any())  # the instruction stays clean
    image_scored = int((prepared.scored & (batch.ids >= IMAGE)).sum())
    assert prepared.counts == {"ce": int(masked.sum()), "rec_image": image_scored, "rec_audio": 0}


def test_ar_objective_scores_next_tokens_of_the_response() -> None:
    model = tiny_model()
    batch = collate([sample("a", [BOS, 5, 6, 7, EOS], 2)], "text", PAD, None)
    prepared = objective(model, "ar").prepare(batch, torch.Generator())
    # positions 1..3 predict 6, 7, <EOS>, the response tokens
    assert prepared.scored.tolist() == [[False, True, True, True, False]]
    assert prepared.targets[prepared.scored].tolist() == [6, 7, EOS]


def test_a_token_weighs_the_same_in_a_short_and_a_long_micro_batch() -> None:
    """Gradient accumulation with window scales equals one pass over all tokens / N."""
    model = tiny_model()
    obj = objective(model)
    short = collate([sample("s", [BOS, 5, 6, EOS], 1)], "text", PAD, None)
    long = collate([sample(f"l{i}", [BOS] + [7 + i] * 12 + [EOS], 1) for i in range(3)],
                   "text", PAD, None)  # fmt: skip
    prepared = [obj.prepare(b, torch.Generator().manual_seed(0)) for b in (short, long)]
    for p in prepared:
        p.t.fill_(0.0)  # everything masked: many tokens in one batch, few in the other
        p.inputs[p.batch.response_mask] = LAYOUT.special_id("<MASK>")
        p.scored = p.batch.response_mask.clone()
        p.counts = obj._counts(p.targets, p.scored)
    totals = {"ce": sum(p.counts["ce"] for p in prepared)}
    scales = window_scales(totals, world=1, grad_accum=2)

    def run(p):
        return obj(p.inputs, p.batch.attention_mask, p.batch.instruction_lengths, p.targets,
                   p.scored, p.t)[0]["ce"]  # fmt: skip

    model.zero_grad()
    for p in prepared:  # as DeepSpeed does it: each micro-batch loss / grad_accum
        (run(p) * scales["ce"] / 2).backward()
    accumulated = [q.grad.clone() for q in model.parameters() if q.grad is not None]
    model.zero_grad()
    (sum(run(p) for p in prepared) / totals["ce"]).backward()
    reference = [q.grad.clone() for q in model.parameters() if q.grad is not None]
    for a, b in zip(accumulated, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # per micro-batch normalisation would weigh the short batch's tokens ~10x more
    assert prepared[0].counts["ce"] * 5 < prepared[1].counts["ce"]


def test_window_scales_undo_deepspeeds_averaging() -> None:
    assert window_scales({"ce": 40, "rec_image": 0}, world=4, grad_accum=2) == {"ce": 0.2}


# ---------------------------------------------------------------------------- GradNorm


def test_gradnorm_raises_the_weight_of_the_term_that_trains_slower() -> None:
    weights = GradNorm(["a", "b"], {"a": 1.0, "b": 1.0}, alpha=1.5, lr=0.05)
    for step in range(30):
        # a halves quickly, b barely moves; equal gradient norms
        losses = {"a": 2.0 * 0.9**step, "b": 2.0 * 0.995**step}
        weights.update(losses, {"a": 1.0, "b": 1.0})
    assert weights.weights["b"] > 1.2 > 0.8 > weights.weights["a"]
    assert sum(weights.weights.values()) == pytest.approx(2.0)


def test_gradnorm_equalises_gradient_norms_at_equal_rates() -> None:
    weights = GradNorm(["a", "b"], {"a": 1.0, "b": 1.0}, alpha=1.5, lr=0.05)
    for _ in range(30):  # same training rate, b's gradient 3x larger: b's weight must fall
        weights.update({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 3.0})
    assert weights.weights["b"] < weights.weights["a"]


def test_gradnorm_norms_come_from_the_heads_alone() -> None:
    """GradNorm's per-term gradients (detached heads on the detached final hidden state, as
    the trainer takes them) equal the full graph's at that state and reach no parameter:
    they cost a pass over the heads, not a backward through the model."""
    model = tiny_model()
    obj = objective(model)
    tokens = [BOS, 5, 6, IMAGE + 1, IMAGE + 2, IMAGE + 3, 7, EOS]
    batch = collate([sample("a", tokens, 2), sample("b", tokens[:6], 1)], "text", PAD, None)
    p = obj.prepare(batch, torch.Generator().manual_seed(0))
    p.scored = p.batch.response_mask.clone()  # every response token: both terms present
    hidden = model(p.inputs, attention_mask=batch.attention_mask,
                   instruction_lengths=batch.instruction_lengths)  # fmt: skip
    attached = obj.term_sums(hidden, p.inputs, p.targets, p.scored, p.t)
    shared = hidden.detach().requires_grad_(True)
    detached = obj.term_sums(shared, p.inputs, p.targets, p.scored, p.t, detached_heads=True)
    assert set(detached) == set(attached) == {"ce", "rec_image", "rec_audio"}
    params = list(model.parameters())
    for term, value in detached.items():
        (mine, *to_params) = torch.autograd.grad(value, [shared, *params], retain_graph=True,
                                                 allow_unused=True)  # fmt: skip
        assert all(g is None for g in to_params)
        (full,) = torch.autograd.grad(attached[term], hidden, retain_graph=True)
        torch.testing.assert_close(mine, full)


def test_gradnorm_state_round_trip_and_absent_terms() -> None:
    weights = GradNorm(["a", "b", "c"], {"a": 2.0, "b": 1.0, "c": 1.0}, alpha=1.0, lr=0.1)
    assert weights.weights == pytest.approx({"a": 1.5, "b": 0.75, "c": 0.75})
    weights.update({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 1.0})  # c absent this step
    weights.update({"a": 0.5, "b": 2.0}, {"a": 1.0, "b": 1.0})
    assert "c" not in weights.initial_losses  # never seen: no L_c(0), no update of its own
    assert weights.weights["a"] < 1.5 and weights.weights["b"] > 0.75
    copy = GradNorm(["a", "b", "c"], {}, alpha=1.0, lr=0.1)
    copy.load_state_dict(json.loads(json.dumps(weights.state_dict())))
    assert copy.weights == weights.weights and copy.initial_losses == weights.initial_losses
    fixed = FixedWeights({"a": 1.0})
    fixed.update({"a": 5.0}, {"a": 5.0})
    assert fixed.weights == {"a": 1.0}


# ---------------------------------------------------------------------------- config, LR, DeepSpeed


def test_lr_warms_up_then_decays_to_the_floor() -> None:
    config = TrainConfig(max_steps=100, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(config)
    assert [f(0), f(4), f(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_train_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="loss_weights"):
        validate(TrainConfig, {"loss_weights": {"rec_video": 1.0}})
    with pytest.raises(ConfigError, match="bucket_weights"):
        validate(TrainConfig, {"bucket_weights": {"text": 0}})
    with pytest.raises(ConfigError, match="cpu_offload"):
        validate(TrainConfig, {"cpu_offload": True, "zero_stage": 2})


def test_deepspeed_config_is_filled_from_train(tmp_path: Path) -> None:
    config = TrainConfig(micro_batch_size=3, grad_accum=5, grad_clip=0.5, zero_stage=2)
    filled = deepspeed_config(config, world_size=4)
    assert filled["train_batch_size"] == 60
    assert filled["gradient_accumulation_steps"] == 5
    assert filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is False
    assert filled["zero_optimization"]["stage"] == 2
    assert not trainer_clips(filled)
    assert deepspeed_config(TrainConfig(zero_stage=3), 2)["zero_optimization"]["stage"] == 3
    template = tmp_path / "ds.json"
    template.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(ValueError, match="train.grad_accum"):
        deepspeed_config(TrainConfig(grad_accum=2, deepspeed_template=str(template)), 1)


def test_one_rank_runs_deepspeed_at_stage_0_unless_it_offloads() -> None:
    """ZeRO over one rank partitions nothing; at stage 0 in fp32 the trainer clips."""
    for stage in (1, 2, 3):
        one = deepspeed_config(TrainConfig(zero_stage=stage, grad_clip=0.5), 1)
        assert one["zero_optimization"]["stage"] == 0
        assert trainer_clips(one) and one["gradient_clipping"] == 0.0
    offload = deepspeed_config(TrainConfig(zero_stage=3, cpu_offload=True, grad_clip=0.5), 1)
    assert offload["zero_optimization"]["stage"] == 3 and offload["gradient_clipping"] == 0.5
    assert not trainer_clips(offload)
    # bf16 at stage 0 goes through DeepSpeed's bf16 optimizer, which clips and reports.
    gpu = deepspeed_config(TrainConfig(zero_stage=0, use_gpu=True, grad_clip=0.5), 2)
    assert not trainer_clips(gpu) and gpu["gradient_clipping"] == 0.5
    cpu = deepspeed_config(TrainConfig(zero_stage=0, grad_clip=0.5), 2)
    assert trainer_clips(cpu) and cpu["gradient_clipping"] == 0.0


# ---------------------------------------------------------------------------- checkpoints


def test_rng_state_round_trip() -> None:
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_only_marked_checkpoints_count_and_old_ones_are_pruned(tmp_path: Path) -> None:
    storage = Storage()
    removed, completed = [], []
    writer = CheckpointWriter(storage, str(tmp_path), rank=0, world=1, keep_last=2,
                              on_complete=lambda s, u: completed.append(s),
                              on_removed=removed.append)  # fmt: skip
    for step in (10, 20, 30):
        writer.local_step_dir(step)
        writer.finish(step, barrier=lambda: None)
    writer.local_step_dir(40)  # written, never finished: a save killed half-way
    assert complete_steps(storage, str(tmp_path)) == [20, 30]
    assert completed == [10, 20, 30] and removed == [10]
    assert not (tmp_path / "step-0000010").exists()
    assert (tmp_path / "step-0000030" / COMPLETE).exists()


def test_run_control_fences_an_old_owner(tmp_path: Path) -> None:
    control = RunControl(Storage(), str(tmp_path))
    first = control.claim()
    assert control.read().owner == first and not control.read().stop
    second = control.claim()
    assert control.read().owner == second != first
    control.request_stop(second)
    assert control.read().stop
