"""The AR baseline on the tiny OmniModel: loss, KV-cached greedy decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tokenization.vocab import VocabLayout
from training.autoregressive import ar_generate, ar_loss
from training.model import OmniModel
from training.model_config import load_model_config

LAYOUT = VocabLayout(text_size=40, image_size=16, audio_size=12)
IMAGE = LAYOUT.offsets["image"]
# Untied heads with a wider init: greedy decoding of the random model does not just repeat
# its input token, so equality tests compare varied sequences.
UNTIED = ("backbone.tie_word_embeddings=false", "backbone.initializer_range=0.2")


def tiny_model(seed: int = 0) -> OmniModel:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1)
    codebooks = {
        "image": torch.randn(16, 8, generator=gen),
        "audio": torch.randn(12, 6, generator=gen),
    }
    return OmniModel(load_model_config("tiny", UNTIED), LAYOUT, codebooks)


@pytest.fixture(scope="module")
def model() -> OmniModel:
    return tiny_model().eval()


def prompt(batch: int, length: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, LAYOUT.text_size, (batch, length), generator=gen)


def greedy_without_cache(model: OmniModel, ids: Tensor, steps: int, group: str) -> Tensor:
    """The reference: the whole causal forward again for every new token."""
    start = model.groups.start[group]
    for _ in range(steps):
        last = model(ids, causal=True)[:, -1]
        ids = torch.cat([ids, model.head_logits(last, group).argmax(-1, keepdim=True) + start], 1)
    return ids


@torch.inference_mode()
@pytest.mark.parametrize("group", ["text", "image"])
def test_greedy_with_kv_cache_equals_recomputing(model: OmniModel, group: str) -> None:
    ids = prompt(3, 6)
    out = ar_generate(model, ids, 12, group=group)
    assert out.shape == (3, 12)
    assert torch.equal(out, greedy_without_cache(model, ids, 12, group)[:, 6:])
    assert bool((model.groups.group_of(out) == model.groups.index(group)).all())


@torch.inference_mode()
def test_padded_instructions_decode_like_each_row_alone(model: OmniModel) -> None:
    ids = prompt(2, 7, seed=3)
    valid = torch.arange(7)[None, :] < torch.tensor([[7], [4]])
    out = ar_generate(model, ids, 8, instruction_mask=valid)
    assert torch.equal(out[0], ar_generate(model, ids[:1], 8)[0])
    assert torch.equal(out[1], ar_generate(model, ids[1:, :4], 8)[0])


@torch.inference_mode()
def test_decoding_stops_at_eos(model: OmniModel) -> None:
    ids = prompt(1, 5, seed=5)
    free = ar_generate(model, ids, 10)[0].tolist()
    stop = max(i for i, token in enumerate(free) if token not in free[:i])  # a first occurrence
    out = ar_generate(model, ids, 10, eos_id=free[stop])[0].tolist()
    assert out == free[: stop + 1]


@torch.inference_mode()
def test_finished_rows_hold_eos_while_others_decode(model: OmniModel) -> None:
    ids = prompt(2, 5, seed=6)
    free = ar_generate(model, ids, 10)
    eos = next(t for t in free[0].tolist() if t not in free[1].tolist())  # row 1 never ends
    first = free[0].tolist().index(eos)
    out = ar_generate(model, ids, 10, eos_id=eos)
    assert out.shape == (2, 10)
    assert out[0].tolist() == free[0, : first + 1].tolist() + [eos] * (9 - first)
    assert torch.equal(out[1], free[1])


def test_ar_loss_is_next_token_cross_entropy_on_the_response(model: OmniModel) -> None:
    ids = torch.cat([prompt(2, 6, seed=7), IMAGE + torch.randint(0, 16, (2, 3))], 1)
    lengths = torch.tensor([4, 6])
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 8] = False
    with torch.no_grad():
        loss = ar_loss(model, ids, lengths, valid)
        hidden = model(ids, attention_mask=valid, causal=True)
        terms = []
        for row, targets in ((0, range(4, 9)), (1, range(6, 8))):
            for j in targets:
                group = model.groups.names[int(model.groups.group_of(ids[row, j]))]
                logits = model.head_logits(hidden[row, j - 1 : j], group)
                local = ids[row, j : j + 1] - model.groups.start[group]
                terms.append(F.cross_entropy(logits, local))
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_ar_loss_decreases_when_overfitting_one_batch() -> None:
    model = tiny_model(seed=1).train()
    ids = torch.cat([prompt(2, 5, seed=8), IMAGE + torch.randint(0, 16, (2, 6))], 1)
    lengths = torch.tensor([3, 5])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = ar_loss(model, ids, lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
