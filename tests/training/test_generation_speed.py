"""benchmarks/generation_speed.py's FLOP accounting, on which its compute bounds rest."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from training.config import CacheConfig, SamplerConfig

REPO = Path(__file__).resolve().parents[2]
BENCHMARK = runpy.run_path(str(REPO / "benchmarks" / "generation_speed.py"))
BATCH, PROMPT, LENGTH, TEXT = 2, 5, 8, 96


@pytest.fixture(scope="module")
def model():  # noqa: ANN201 - the benchmark's OmniModel
    return BENCHMARK["build_model"]("tiny", "cpu", "float32", TEXT)


def decode(model, sampler: SamplerConfig):  # noqa: ANN001, ANN201
    instruction = torch.randint(
        0, TEXT, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0)
    )
    decoder = BENCHMARK["DfmDecoder"](model, instruction, LENGTH, sampler)
    with torch.inference_mode():
        decoder()
    return decoder


def test_a_position_costs_two_flops_per_weight_of_the_layer(model) -> None:  # noqa: ANN001
    bb = model.config.backbone
    kv = bb.num_key_value_heads * model.head_dim
    weights = (
        2 * bb.hidden_size**2 + 2 * bb.hidden_size * kv + 3 * bb.hidden_size * bb.intermediate_size
    )
    assert BENCHMARK["linear_flops_per_position"](model) == 2 * weights


def test_without_a_cache_every_step_runs_instruction_and_canvas(model) -> None:  # noqa: ANN001
    decoder = decode(
        model, SamplerConfig(tokens_per_step=4, temperature=0, cache=CacheConfig(enabled=False))
    )
    layers, hidden = model.config.backbone.num_hidden_layers, model.config.backbone.hidden_size
    per_position = BENCHMARK["linear_flops_per_position"](model)
    steps = LENGTH // 4
    backbone = steps * layers * BATCH * (PROMPT + LENGTH) * per_position
    head = BATCH * (8 + 4) * 2 * hidden * model.groups.size["text"]  # masked positions asked
    assert decoder.flops == backbone + head


def test_the_active_cache_counts_only_what_it_recomputes(model) -> None:  # noqa: ANN001
    exact = decode(
        model,
        SamplerConfig(
            tokens_per_step=2, temperature=0, decode_block=4, cache=CacheConfig(enabled=False)
        ),
    )
    active = decode(
        model,
        SamplerConfig(
            tokens_per_step=2,
            temperature=0,
            decode_block=4,
            cache=CacheConfig(strategy="active", full_refresh_every=100),
        ),
    )
    layers = model.config.backbone.num_hidden_layers
    per_position = BENCHMARK["linear_flops_per_position"](model)
    hidden, vocab = model.config.backbone.hidden_size, model.groups.size["text"]
    # Blocks of 4, 2 a step: the head sees 4, 2, 4, 2 masked positions per row. The first
    # step runs the whole canvas (8), each later one the block's masked positions and the
    # two just committed: 2 + 2, 4 + 2, 2 + 2.
    head = BATCH * (4 + 2 + 4 + 2) * 2 * hidden * vocab
    recomputed = layers * BATCH * (LENGTH + 4 + 6 + 4)
    assert active.flops == (recomputed + layers * BATCH * PROMPT) * per_position + head
    assert active.flops < exact.flops


class Timed:
    """A decoder call that takes a set number of seconds (``timed`` reads them)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.recomputed_fraction, self.flops = seconds, 1.0, 1.0

    def __call__(self) -> None:
        return None


@pytest.mark.parametrize("compiled_faster", [True, False])
def test_every_ratio_is_against_the_faster_ar(
    model,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
    compiled_faster: bool,
) -> None:
    seconds = {"dfm_block": 4.0, "ar": 2.0, "ar_compiled": 1.0 if compiled_faster else 3.0}
    modes = tuple(seconds)
    namespace = BENCHMARK["measure"].__globals__  # run_path returned a copy of it
    monkeypatch.setitem(
        namespace, "decoders", lambda *args, **kwargs: {m: Timed(s) for m, s in seconds.items()}
    )
    monkeypatch.setitem(namespace, "timed", lambda run, device: run.seconds)
    instruction = torch.zeros(BATCH, PROMPT, dtype=torch.long)
    sampler = SamplerConfig(tokens_per_step=2, temperature=0)
    row = BENCHMARK["measure"](
        model, instruction, LENGTH, sampler, sampler, modes, 1, torch.device("cpu")
    )
    fastest = min(seconds["ar"], seconds["ar_compiled"])
    assert row["ar_yardstick"] == ("ar_compiled" if compiled_faster else "ar")
    assert row["ratio_dfm_block_vs_ar"] == fastest / seconds["dfm_block"]
    assert row["ratio_ar_compiled_vs_ar"] == round(seconds["ar"] / seconds["ar_compiled"], 3)
    assert row["ar_seconds_per_token"] == round(fastest / LENGTH, 4)
