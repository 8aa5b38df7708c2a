"""The model, paths and samplers on a CUDA device in bf16 (skipped where there is none).

CPU runs the same code in every other test; this file checks what only a GPU can break:
tensors or generators left on the CPU, dtype mismatches under bf16, and the attention
backend picked on CUDA. Run on a GPU machine with ``pytest tests/training/test_cuda.py``;
``OMNI_TEST_DEVICE=cpu`` runs the same checks on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from tokenization.vocab import VocabLayout
from training.attention import flash_attn_installed
from training.autoregressive import ar_generate, ar_loss
from training.config import CacheConfig, SamplerConfig
from training.dfm import (
    MaskedPath,
    MetricPath,
    MetricScheduler,
    PolynomialScheduler,
    UniformPath,
    VocabGroups,
    cross_entropy_sum,
)
from training.generation import generate
from training.model import OmniModel
from training.model_config import load_model_config
from training.static_ar import StaticArDecoder

DEVICE = os.environ.get("OMNI_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)

LAYOUT = VocabLayout(text_size=96, image_size=32, audio_size=16)


@pytest.fixture(scope="module")
def model() -> OmniModel:
    torch.manual_seed(0)
    codebooks = {m: torch.randn(LAYOUT.sizes[m], 8) for m in ("image", "audio")}
    config = load_model_config("tiny", ("dtype=bfloat16",))
    return OmniModel(config, LAYOUT, codebooks).to(DEVICE, torch.bfloat16).eval()


def paths(model: OmniModel) -> dict[str, object]:
    groups = VocabGroups.from_layout(LAYOUT)
    mask_id = LAYOUT.special_id("<MASK>")
    vectors = {
        "text": model.backbone.embed_tokens.weight.detach().float(),
        "image": model.codebook("image").float(),
        "audio": model.codebook("audio").float(),
    }
    return {
        "masked": MaskedPath(PolynomialScheduler(1.0), groups, mask_id),
        "uniform": UniformPath(PolynomialScheduler(1.0), groups),
        "metric": MetricPath(MetricScheduler(), groups, vectors),
    }


def test_dfm_training_step_in_bf16(model: OmniModel) -> None:
    path = paths(model)["masked"]
    x1 = torch.randint(0, LAYOUT.text_size, (2, 64), device=DEVICE)
    response = torch.zeros_like(x1, dtype=torch.bool)
    response[:, 32:] = True
    model.train()
    try:
        xt = path.sample(x1, torch.rand(2, device=DEVICE), response)
        where = path.loss_mask(xt, x1, response)
        hidden = model(xt, instruction_lengths=torch.full((2,), 32, device=DEVICE))
        loss = cross_entropy_sum(model.head_logits(hidden[where], "text"), x1[where])
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    flash = DEVICE == "cuda" and flash_attn_installed()
    assert model.backend == ("flash_attention_2" if flash else "sdpa")
    assert torch.isfinite(loss) and loss.item() > 0


@pytest.mark.parametrize("name", ["masked", "uniform", "metric"])
def test_euler_generation_on_every_path(model: OmniModel, name: str) -> None:
    instruction = torch.randint(0, LAYOUT.text_size, (2, 8), device=DEVICE)
    config = SamplerConfig(
        method="euler", steps=4, temperature=1.0, max_length=64, cache=CacheConfig(enabled=False)
    )
    generator = torch.Generator(DEVICE).manual_seed(0)
    rows = generate(model, instruction, "image", paths(model)[name], config, media_tokens=16,
                    generator=generator)  # fmt: skip
    image = LAYOUT.offsets["image"]
    for row in rows:
        assert row.device.type == DEVICE
        media = row[1:-1]
        assert len(media) == 16 and bool(((media >= image) & (media < image + 32)).all())


def test_confidence_generation_with_the_adaptive_cache(model: OmniModel) -> None:
    instruction = torch.randint(0, LAYOUT.text_size, (2, 8), device=DEVICE)
    config = SamplerConfig(tokens_per_step=8, temperature=0.0, max_length=64)
    rows = generate(model, instruction, "text", paths(model)["masked"], config)
    assert len(rows) == 2 and all(row.device.type == DEVICE and len(row) <= 64 for row in rows)


def test_ar_baseline(model: OmniModel) -> None:
    instruction = torch.randint(0, LAYOUT.text_size, (2, 8), device=DEVICE)
    out = ar_generate(model, instruction, 12)
    assert out.shape == (2, 12) and out.device.type == DEVICE
    ids = torch.cat([instruction, out], 1)
    loss = ar_loss(model, ids, torch.full((2,), 8, device=DEVICE))
    assert torch.isfinite(loss)


def test_compiled_ar_decodes_as_eager(model: OmniModel) -> None:
    """The static-cache step compiled (on CUDA: captured as a CUDA graph) gives the eager
    tokens, call after call on the same shape."""
    instruction = torch.randint(0, LAYOUT.text_size, (2, 8), device=DEVICE)
    expected = StaticArDecoder(model)(instruction, 12)
    assert torch.equal(expected, ar_generate(model, instruction, 12))
    compiled = StaticArDecoder(model, compile=True)
    for _ in range(3):
        assert torch.equal(compiled(instruction, 12), expected)


def test_block_decoding_with_compiled_active_steps(model: OmniModel) -> None:
    """Blocks of 16 with the active cache, its partial steps compiled, across full refreshes
    (new values copied into the buffers the graphs were captured with)."""
    instruction = torch.randint(0, LAYOUT.text_size, (2, 8), device=DEVICE)
    cache = CacheConfig(strategy="active", full_refresh_every=4, compile=True)
    config = SamplerConfig(
        tokens_per_step=2, temperature=0.0, max_length=64, decode_block=16, cache=cache
    )
    for _ in range(2):
        rows = generate(model, instruction, "text", paths(model)["masked"], config)
        assert len(rows) == 2 and all(row.device.type == DEVICE and len(row) <= 64 for row in rows)
