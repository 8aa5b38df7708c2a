"""oneDNN-packed linear layers: same numbers as nn.Linear, fresh after weight updates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tokenization.vocab import VocabLayout
from training.autoregressive import ar_generate
from training.model import OmniModel
from training.model_config import load_model_config
from training.packed_linear import PackedLinears, onednn_available

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def layer(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(48, 80, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (2, 3, 48)])
@torch.inference_mode()
def test_packed_layer_computes_what_the_layer_does(bias: bool, shape: tuple[int, ...]) -> None:
    linear, packed = layer(bias), PackedLinears()
    x = torch.randn(shape)
    out = packed(linear, x)
    assert out.shape == (*shape[:-1], 80)
    torch.testing.assert_close(out, linear(x), atol=1e-5, rtol=1e-5)
    assert len(packed._packed) == 1  # the packed path ran, not the fallback


def test_a_weight_update_is_packed_again() -> None:
    linear, packed = layer(), PackedLinears()
    x = torch.randn(4, 48)
    with torch.inference_mode():
        before = packed(linear, x)
    with torch.no_grad():
        linear.weight.mul_(-1)  # in place: same storage, new version
    with torch.inference_mode():
        after = packed(linear, x)
        torch.testing.assert_close(after, linear(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


def test_stacked_layers_compute_what_each_does_and_follow_updates() -> None:
    torch.manual_seed(0)
    layers = (nn.Linear(48, 80), nn.Linear(48, 16, bias=False), nn.Linear(48, 32))
    packed = PackedLinears()
    x = torch.randn(2, 5, 48)
    with torch.inference_mode():
        outs = packed.fused(layers, x)
        for out, layer in zip(outs, layers, strict=True):
            torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layers[1].weight.add_(1.0)  # one member changes: the stack is packed again
    with torch.inference_mode():
        torch.testing.assert_close(packed.fused(layers, x)[1], layers[1](x), atol=1e-5, rtol=1e-5)
    assert len(packed._packed) == 1


def test_training_runs_the_layer_itself() -> None:
    linear, packed = layer(), PackedLinears()
    out = packed(linear, torch.randn(3, 48))
    out.sum().backward()
    assert linear.weight.grad is not None
    assert not packed._packed


LAYOUT = VocabLayout(text_size=40, image_size=16, audio_size=12)


def tiny(cpu_linear: str) -> OmniModel:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    codebooks = {
        "image": torch.randn(16, 8, generator=gen),
        "audio": torch.randn(12, 6, generator=gen),
    }
    config = load_model_config(
        "tiny", ("backbone.tie_word_embeddings=false", "backbone.initializer_range=0.2",
                 f"cpu_linear={cpu_linear}")
    )  # fmt: skip
    return OmniModel(config, LAYOUT, codebooks).eval()


@torch.inference_mode()
def test_the_model_decodes_the_same_with_either_kernel() -> None:
    packed, plain = tiny("onednn"), tiny("aten")
    assert plain.packed is None
    prompt = torch.randint(0, LAYOUT.text_size, (2, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ar_generate(packed, prompt, 12), ar_generate(plain, prompt, 12))
    assert packed.packed is not None and len(packed.packed._packed) > 0
    ids = torch.randint(0, LAYOUT.size, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(packed(ids), plain(ids), atol=1e-5, rtol=1e-5)


def test_a_copied_model_starts_without_the_packed_weights() -> None:
    model = tiny("onednn")
    with torch.inference_mode():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert model.packed is not None and model.packed._packed
    # deepcopy goes through the same __reduce_ex__ / __getstate__ as pickling (Ray)
    clone = copy.deepcopy(model)
    assert clone.packed is not None and not clone.packed._packed
    with torch.inference_mode():
        torch.testing.assert_close(clone(torch.ones(1, 4, dtype=torch.long)),
                                   model(torch.ones(1, 4, dtype=torch.long)))  # fmt: skip
