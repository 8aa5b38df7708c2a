"""The retrieval task on an eval split with duplicate media and captions.

The model is a stand-in that embeds a medium or a caption as the (normalised) sum of the
concepts it shows, as a perfect model would: identical inputs embed identically, so a
duplicate ties with its twin. Everything else is the task's own code.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from evaluation.config import SuiteConfig
from evaluation.tasks import retrieval
from evaluation.tasks.base import TaskContext
from tokenization.token_samples import TokenSample

SPECIALS = {"<BOS>": 1, "<EOS>": 2, "<PAD>": 0}
# pair -> (medium ids, caption ids, concept the model maps both to)
PAIRS = [
    ([100, 101], [10, 11], 0),  # image A, "a cat"
    ([100, 101], [12, 13], 0),  # image A again, "a kitten": a duplicate medium
    ([102, 103], [14, 15], 1),  # image B, "a dog"
    ([104, 105], [14, 15], 2),  # image C, "a dog" again: a duplicate caption (B and C)
    ([106, 107], [16, 17], 3),
]
CONCEPTS: dict[tuple[int, ...], set[int]] = {}
for _medium, _caption, _concept in PAIRS:
    CONCEPTS.setdefault(tuple(_medium), set()).add(_concept)
    CONCEPTS.setdefault(tuple(_caption), set()).add(_concept)


class ConceptModel:
    """Embeds a sequence as the sum of the one-hot vectors of its content's concepts."""

    device = torch.device("cpu")
    layout = SimpleNamespace(special_id=SPECIALS.__getitem__)

    def eos_embedding(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        rows = []
        for row in ids.tolist():
            content = tuple(i for i in row if i not in SPECIALS.values() and i < 200)
            rows.append(F.one_hot(torch.tensor(sorted(CONCEPTS[content])), 8).float().sum(0))
        return torch.stack(rows)


def sample(index: int) -> TokenSample:
    medium, caption, _ = PAIRS[index]
    # <BOS> <BOI>=200 ids <EOI>=201 | caption <EOS>
    instruction = [1, 200, *medium, 201]
    tokens = torch.tensor(instruction + caption + [2])
    meta = {"instruction_length": len(instruction), "split": "eval"}
    return TokenSample(f"k{index}", tokens, torch.zeros_like(tokens, dtype=torch.uint8), meta)


def test_duplicates_are_hits_in_both_directions() -> None:
    samples = [sample(i) for i in range(len(PAIRS))]
    context = TaskContext(
        loaded=SimpleNamespace(model=ConceptModel()),
        suite=SuiteConfig(batch_size=2),
        samples={"image2text": samples},
        dgs_block=1,
    )
    metrics = retrieval.run(context).metrics
    # pairs 0/1 share image A, pairs 2/3 share "a dog": each ties with its twin
    assert metrics["retrieval/text2image/r1"] == 1.0
    assert metrics["retrieval/image2text/r1"] == 1.0
    assert metrics["retrieval/text2image/median_rank"] == 1.0
    # four of five queries have two positives among five candidates, one has one
    assert metrics["retrieval/text2image/chance_r1"] == (4 * 2 / 5 + 1 / 5) / 5


def test_pair_positives_join_shared_media_and_shared_captions() -> None:
    media = [torch.tensor(m) for m, _, _ in PAIRS]
    texts = [torch.tensor(t) for _, t, _ in PAIRS]
    positives = retrieval.pair_positives(media, texts)
    assert positives.equal(positives.T)
    assert positives.sum(1).tolist() == [2, 2, 2, 2, 1]
    assert positives[0, 1] and positives[2, 3] and not positives[1, 2]


def pair(medium: list[int], caption: list[int], label: str) -> TokenSample:
    instruction = [1, 200, *medium, 201]
    tokens = torch.tensor(instruction + caption + [2])
    meta = {"instruction_length": len(instruction), "split": "eval", "label": label}
    return TokenSample("k", tokens, torch.zeros_like(tokens, dtype=torch.uint8), meta)


def test_samples_of_one_class_answer_each_other() -> None:
    """Image A (concept 0) is paired with a caption of concept 3 and image D (concept 3)
    with one of concept 0, both of class 7: each image's best caption is the other pair's,
    a hit once a class's captions all answer its images, a miss by pairs alone."""
    samples = [pair([100, 101], [16, 17], "7"), pair([106, 107], [10, 11], "7"),
               pair([102, 103], [14, 15], "1")]  # fmt: skip
    positives = retrieval.label_positives(samples)
    assert positives.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    context = TaskContext(
        loaded=SimpleNamespace(model=ConceptModel()),
        suite=SuiteConfig(batch_size=2),
        samples={"image2text": samples},
        dgs_block=1,
    )
    metrics = retrieval.run(context).metrics
    assert metrics["retrieval/image2text/r1"] == 1.0
    assert metrics["retrieval/image2text/chance_r1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    for s in samples:
        del s.meta["label"]
    assert not retrieval.label_positives(samples).any()
    assert retrieval.run(context).metrics["retrieval/image2text/r1"] == pytest.approx(1 / 3)
