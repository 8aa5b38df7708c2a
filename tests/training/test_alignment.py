"""The <EOS> alignment term: its pairs, its InfoNCE, and that it teaches retrieval."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.training.test_trainer_parts import BOS, EOS, IMAGE, LAYOUT, PAD, sample, tiny_model
from training.alignment import contrastive_sum, pairs_of
from training.dfm import PathConfig, build_path
from training.micro_batch import collate
from training.objective import Objective

BOI, EOI = LAYOUT.special_id("<BOI>"), LAYOUT.special_id("<EOI>")


def image_caption(key: str, image: list[int], caption: list[int]) -> object:
    """``<BOS> <BOI> image <EOI>`` then ``caption <EOS>``, an image2text sample."""
    instruction = [BOS, BOI, *(IMAGE + i for i in image), EOI]
    return sample(key, instruction + caption + [EOS], len(instruction), "image2text")


def test_pairs_are_the_medium_alone_and_the_text_alone_with_duplicates_as_positives() -> None:
    batch = collate(
        [
            image_caption("a", [1, 2], [5, 6, 7]),
            image_caption("b", [3], [8]),
            image_caption("c", [4, 4], [5, 6, 7]),
        ],
        "image2text",
        PAD,
        4,  # DGS <PAD> after each <EOS>, then batch padding: neither is part of a text
    )
    pairs = pairs_of(batch, LAYOUT)
    media = [row[mask].tolist() for row, mask in zip(pairs.media, pairs.media_mask, strict=True)]
    texts = [row[mask].tolist() for row, mask in zip(pairs.texts, pairs.text_mask, strict=True)]
    assert media == [
        [BOS, BOI, IMAGE + 1, IMAGE + 2, EOI, EOS],
        [BOS, BOI, IMAGE + 3, EOI, EOS],
        [BOS, BOI, IMAGE + 4, IMAGE + 4, EOI, EOS],
    ]
    assert texts == [[BOS, 5, 6, 7, EOS], [BOS, 8, EOS], [BOS, 5, 6, 7, EOS]]
    assert pairs.positives.tolist() == [
        [True, False, True],
        [False, True, False],
        [True, False, True],
    ]
    text2image = collate([sample("t", [BOS, 5, EOS, IMAGE + 1, EOS], 3)], "text2image", PAD, 4)
    assert pairs_of(text2image, LAYOUT) is None


def test_infonce_is_the_softmax_mass_missed_on_the_positives() -> None:
    eye = torch.eye(2)
    temperature = 0.5
    # Each row: -log(e^(1/T) / (e^(1/T) + e^0)), both directions the same, two rows.
    expected = 2 * (math.log(math.exp(1 / temperature) + 1) - 1 / temperature)
    value = contrastive_sum(eye, eye, torch.eye(2, dtype=torch.bool), temperature)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # Swapped texts score worse; every text a positive costs nothing.
    swapped = contrastive_sum(eye, eye.flip(0), torch.eye(2, dtype=torch.bool), temperature)
    assert swapped.item() > value.item()
    everything = torch.ones(2, 2, dtype=torch.bool)
    assert contrastive_sum(eye, eye.flip(0), everything, temperature).item() == pytest.approx(0)


def test_the_objective_adds_the_term_on_paired_buckets_only_and_it_teaches_retrieval() -> None:
    """Eight images, each with its own caption: trained on the alignment term alone, each
    image's <EOS> state ends nearest its own caption's (recall@1 from chance to 1)."""
    model = tiny_model()
    objective = Objective(model, "dfm", build_path(PathConfig(), LAYOUT), "cross_entropy", 0.1)
    samples = [image_caption(str(i), [i, 2 * i, 3 * i], [10 + i, 20 + i]) for i in range(8)]
    batch = collate(samples, "image2text", PAD, 4)
    generator = torch.Generator().manual_seed(0)
    prepared = objective.prepare(batch, generator)
    assert prepared.counts["align"] == 8
    other = collate([sample("t", [BOS, 5, EOS, IMAGE + 1, EOS], 3)], "text2image", PAD, 4)
    assert objective.prepare(other, generator).counts["align"] == 0

    def recall_at_1() -> float:
        with torch.no_grad():
            pairs = prepared.pairs
            media = F.normalize(model.eos_embedding(pairs.media, pairs.media_mask), dim=-1)
            texts = F.normalize(model.eos_embedding(pairs.texts, pairs.text_mask), dim=-1)
        return float(((media @ texts.T).argmax(1) == torch.arange(8)).float().mean())

    before = recall_at_1()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        sums, _, _ = objective(
            prepared.inputs, batch.attention_mask, batch.instruction_lengths,
            prepared.targets, prepared.scored, prepared.t, prepared.pairs,
        )  # fmt: skip
        optimizer.zero_grad()
        (sums["align"] / 8).backward()
        optimizer.step()
    assert before < 0.5
    assert recall_at_1() == 1.0


def test_the_ar_baseline_takes_the_same_term() -> None:
    """The AR baseline gets the term too, so DFM and AR compare on retrieval alike."""
    model = tiny_model()
    objective = Objective(model, "ar", None, "cross_entropy", 0.1)
    batch = collate([image_caption(str(i), [i], [10 + i]) for i in range(3)], "image2text",
                    PAD, None)  # fmt: skip
    prepared = objective.prepare(batch, torch.Generator().manual_seed(0))
    assert prepared.counts["align"] == 3
    sums, _, _ = objective(
        prepared.inputs, batch.attention_mask, batch.instruction_lengths,
        prepared.targets, prepared.scored, prepared.t, prepared.pairs,
    )  # fmt: skip
    assert sums["align"].item() > 0 and sums["align"].requires_grad
