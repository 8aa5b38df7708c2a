"""The fixed-shape AR decoder: the tokens of ``ar_generate``, one compiled graph per shape."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from tests.training.test_autoregressive import prompt, tiny_model
from training import caches
from training.autoregressive import ar_generate
from training.model import OmniModel
from training.static_ar import StaticArDecoder


@pytest.fixture(scope="module")
def model() -> OmniModel:
    return tiny_model().eval()


@pytest.fixture(autouse=True)
def poisoned_spare_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache slots not yet written hold NaN (what an allocator may leave there): a step
    that lets them reach its output decodes garbage."""
    grow = caches._grow

    def grow_with_nan(buffer: Tensor, capacity: int, dim: int) -> Tensor:
        grown = grow(buffer, capacity, dim)
        if grown.is_floating_point():
            grown.narrow(dim, buffer.shape[dim], capacity - buffer.shape[dim]).fill_(torch.nan)
        return grown

    monkeypatch.setattr(caches, "_grow", grow_with_nan)


@pytest.mark.parametrize("group", ["text", "image"])
def test_fixed_shape_steps_decode_the_tokens_of_ar_generate(model: OmniModel, group: str) -> None:
    ids = prompt(3, 6)
    decoder = StaticArDecoder(model, group)
    expected = ar_generate(model, ids, 12, group=group)
    assert torch.equal(decoder(ids, 12), expected)
    assert torch.equal(decoder(ids, 12, capacity=40), expected)  # a larger cache, same tokens


def test_padded_instructions_and_eos_as_ar_generate(model: OmniModel) -> None:
    ids = prompt(2, 7, seed=3)
    valid = torch.arange(7)[None, :] < torch.tensor([[7], [4]])
    decoder = StaticArDecoder(model)
    expected = ar_generate(model, ids, 10, instruction_mask=valid)
    assert torch.equal(decoder(ids, 10, instruction_mask=valid), expected)
    eos = expected[0, 3].item()  # row 0 finishes at its 4th token at the latest
    with_eos = ar_generate(model, ids, 10, eos_id=eos, instruction_mask=valid)
    assert torch.equal(decoder(ids, 10, eos_id=eos, instruction_mask=valid), with_eos)


def test_a_cache_too_small_for_the_tokens_is_refused(model: OmniModel) -> None:
    with pytest.raises(ValueError, match="capacity 10"):
        StaticArDecoder(model)(prompt(1, 6), 8, capacity=10)


@pytest.mark.integration
def test_compiled_step_is_one_graph_per_shape_and_decodes_the_same_tokens(
    model: OmniModel,
) -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ids = prompt(3, 6)
    decoder = StaticArDecoder(model, compile=True)
    expected = ar_generate(model, ids, 12)
    for capacity in (None, 40, 40, None):  # two shapes, each reused
        assert torch.equal(decoder(ids, 12, capacity=capacity), expected), capacity
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
