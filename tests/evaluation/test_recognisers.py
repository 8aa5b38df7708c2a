"""Recognisers of labelled corpora and the label metrics built on them."""

from __future__ import annotations

import pytest
import torch

from evaluation.metrics import exact_match, label_scores
from evaluation.recognisers import fit_audio, fit_image, fit_text, mel_features
from tokenization.token_samples import TokenSample


def bars(label: int, count: int, seed: int) -> torch.Tensor:
    """Images of a bright vertical bar at column band ``label`` (4 classes), noisy."""
    gen = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.rand(count, 3, 32, 32, generator=gen)
    images[:, :, :, label * 8 : label * 8 + 8] += 0.8
    return images.clamp(0, 1)


def test_image_recogniser_names_classes_it_was_fitted_on() -> None:
    train = torch.cat([bars(c, 10, seed=c) for c in range(4)])
    labels = [str(c) for c in range(4) for _ in range(10)]
    judge = fit_image(train, labels)
    assert not isinstance(judge, str)
    test = torch.cat([bars(c, 5, seed=10 + c) for c in range(4)])
    truth = [str(c) for c in range(4) for _ in range(5)]
    assert judge.accuracy(test.mean(1, keepdim=True).expand(-1, 3, -1, -1), truth) == 1.0
    assert judge.classes == ["0", "1", "2", "3"]


def test_no_recogniser_without_labels_or_classes() -> None:
    images = bars(0, 6, seed=0)
    assert fit_image(images, [None] * 6) == "image: the training samples carry no label"
    assert "fewer than 2 classes" in fit_image(images, ["0"] * 6)
    assert "fewer than 2 classes" in fit_image(images, ["0"] * 5 + ["1"])


def test_text_recogniser_reads_the_class_and_never_credits_an_empty_text() -> None:
    words = ["zero", "one", "two"]
    templates = ("a handwritten {}", "the digit {}", "{}", "a {} digit", "it is {}")
    texts = [t.format(w) for w in words for t in templates]
    labels = [str(i) for i in range(3) for _ in templates]
    # A class seen once ("forty two") is fitted on nothing and judged never.
    texts, labels = texts + ["forty two"], labels + ["42"]
    judge = fit_text(texts, labels)
    assert not isinstance(judge, str)
    assert judge.predict(["an image of a two", "", "xyzzy", "one"]) == ["2", None, None, "1"]
    assert judge.accuracy(["", "two"], ["0", "2"]) == 0.5
    assert judge.classes == ["0", "1", "2"]
    assert judge.judges("1") and not judge.judges("42") and not judge.judges(None)
    samples = [
        TokenSample(str(i), torch.zeros(1), torch.zeros(1), {"label": label} if label else {})
        for i, label in enumerate(["2", None, "42", 1])
    ]
    notes: list[str] = []
    assert judge.judged(samples, "understanding/x", notes) == ([0, 3], ["2", "1"])
    assert notes == ["understanding/x: 2 of 4 eval samples have no label the recogniser "
                     "knows (3 classes): not judged"]  # fmt: skip


def test_audio_recogniser_handles_clips_of_any_length() -> None:
    gen = torch.Generator().manual_seed(0)

    def clip(label: int, frames: int) -> torch.Tensor:
        mel = 0.1 * torch.randn(16, frames, generator=gen)
        mel[label * 4 : label * 4 + 4] += 1.0  # a band per class
        return mel

    train = [clip(c, 20 + 3 * i) for c in range(4) for i in range(6)]
    labels = [str(c) for c in range(4) for _ in range(6)]
    assert mel_features(train).shape == (24, 16 * 24)
    judge = fit_audio(train, labels)
    assert not isinstance(judge, str)
    assert judge.accuracy([clip(c, 31) for c in range(4)], ["0", "1", "2", "3"]) == 1.0


def test_label_scores_give_chance_and_the_majority_baseline() -> None:
    scores = label_scores(["1", None, "2", "1"], ["1", "1", "2", "3"], ["1", "2", "3", "4"], "1")
    assert scores == {"accuracy": 0.5, "chance": 0.25, "majority": 0.5}
    with pytest.raises(ValueError):
        label_scores([], [], ["1"], "1")


def test_exact_match_ignores_case_and_spacing_only() -> None:
    assert exact_match(["The digit  7", "a seven"], ["the digit 7", "a 7"]) == 0.5
