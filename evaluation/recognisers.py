"""Judges for corpora whose samples carry a class: recognisers fitted on the training split.

A caption can be right without matching its reference word for word ("the digit 7" for "a
handwritten seven"), and a generated image or clip has no reference to be equal to. Where
the samples name their class (``meta.json``'s ``label``, which pretokenize copies from the
document), each medium gets a plain classifier fitted on the *training* split's references:
logistic regression on the decoded reference images (grey levels pooled to 16 x 16), on the
decoded reference mels (resampled to a fixed number of frames), and on the words of the
reference texts. A generation then counts as right when its recogniser names the sample's
class. The same recogniser's accuracy on the eval split's own references is the ceiling
reported beside it: what a perfect model would score under this judge.

Media are judged as the tokenizer decodes them (the model's references and its generations
go through the same decoder), so the score measures the tokens the model chose, not the
tokenizer. Corpora without labels get no recogniser; the tasks say so in their notes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from tokenization.bundle import Tokenizers
from tokenization.token_samples import TokenSample
from tokenization.vocab import VocabLayout

IMAGE_SIDE = 16  # decoded images are pooled to 16 x 16 grey levels
MEL_FRAMES = 24  # decoded mels are resampled to 24 frames
MIN_PER_CLASS = 5  # a class is recognised only with this many training examples


def label_of(sample: TokenSample) -> str | None:
    """The sample's class as pretokenize recorded it (``meta.json`` ``label``), or None."""
    label = sample.meta.get("label")
    return None if label is None else str(label)


def image_features(pixels: Tensor) -> np.ndarray:
    """Float[B, 3, R, R] images in [0, 1] -> (B, 256) grey levels pooled to 16 x 16."""
    grey = pixels.float().mean(1, keepdim=True).clamp(0, 1)
    return F.adaptive_avg_pool2d(grey, IMAGE_SIDE).flatten(1).cpu().numpy()


def mel_features(mels: Sequence[Tensor]) -> np.ndarray:
    """Log-mels Float[n_mels, F_i] -> (B, n_mels * 24): each resampled to 24 frames (linear),
    so clips of any length compare; a spoken digit spans about a second."""
    rows = [
        F.interpolate(mel.float()[None], size=MEL_FRAMES, mode="linear", align_corners=False)[0]
        for mel in mels
    ]
    return torch.stack(rows).flatten(1).cpu().numpy()


@dataclass
class Recogniser:
    """A fitted classifier of one medium. ``predict`` takes the medium as the tasks hold it
    (images Float[B, 3, R, R], a list of mels, a list of texts) and names a class for each,
    or None where it cannot tell (a text with no word it knows). Only samples of one of
    ``classes`` can be judged (:meth:`judges`)."""

    medium: str
    classes: list[str]
    majority: str  # the most frequent training class: the best constant answer
    model: Any  # a fitted scikit-learn pipeline
    featurize: Callable[[Any], Any]
    abstain: Callable[[Any], np.ndarray] | None = None

    def predict(self, inputs: Any) -> list[str | None]:
        if len(inputs) == 0:
            return []
        predicted: list[str | None] = [str(p) for p in self.model.predict(self.featurize(inputs))]
        if self.abstain is not None:
            silent = self.abstain(inputs)
            predicted = [None if s else p for p, s in zip(predicted, silent, strict=True)]
        return predicted

    def judges(self, label: str | None) -> bool:
        """Whether a sample of class ``label`` can be judged (its class was fitted)."""
        return label in self.classes

    def judged(
        self, samples: Sequence[TokenSample], prefix: str, notes: list[str]
    ) -> tuple[list[int], list[str]]:
        """The indices and labels of the ``samples`` this recogniser can judge; a note in
        ``notes`` says how many it cannot."""
        indices = [i for i, sample in enumerate(samples) if self.judges(label_of(sample))]
        if len(indices) < len(samples):
            notes.append(
                f"{prefix}: {len(samples) - len(indices)} of {len(samples)} eval samples have "
                f"no label the recogniser knows ({len(self.classes)} classes): not judged"
            )
        return indices, [str(label_of(samples[i])) for i in indices]

    def accuracy(self, inputs: Any, labels: Sequence[str]) -> float:
        """Share of ``inputs`` recognised as their label."""
        if len(labels) == 0:
            raise ValueError("no labelled inputs")
        predicted = self.predict(inputs)
        return sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)


def _classes(labels: Sequence[str | None]) -> set[str] | str:
    """The classes with at least ``MIN_PER_CLASS`` training examples, or why there are
    fewer than two (a recogniser cannot judge a class it has barely seen: the digits
    corpus's spoken numbers 10-99 have about two clips each, its digits dozens)."""
    counts = Counter(label for label in labels if label is not None)
    if not counts:
        return "the training samples carry no label"
    kept = {label for label, n in counts.items() if n >= MIN_PER_CLASS}
    if len(kept) < 2:
        return f"fewer than 2 classes with {MIN_PER_CLASS}+ labelled training samples"
    return kept


def _fit(
    medium: str,
    inputs: Any,
    labels: Sequence[str | None],
    model: Any,
    featurize: Callable[[Any], Any],
    abstain: Callable[[Any], np.ndarray] | None = None,
) -> Recogniser | str:
    classes = _classes(labels)
    if isinstance(classes, str):
        return f"{medium}: {classes}"
    keep = [i for i, label in enumerate(labels) if label in classes]
    y = [str(labels[i]) for i in keep]
    features = featurize([inputs[i] for i in keep] if isinstance(inputs, list) else inputs[keep])
    model.fit(features, y)
    majority = Counter(y).most_common(1)[0][0]
    return Recogniser(medium, sorted(set(y)), majority, model, featurize, abstain)


def _classifier() -> Any:
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))


def fit_image(pixels: Tensor, labels: Sequence[str | None]) -> Recogniser | str:
    """Logistic regression on pooled grey levels; a str says why none could be fitted."""
    return _fit("image", pixels, labels, _classifier(), image_features)


def fit_audio(mels: Sequence[Tensor], labels: Sequence[str | None]) -> Recogniser | str:
    """Logistic regression on mels resampled to 24 frames; a str says why none was fitted."""
    return _fit("audio", list(mels), labels, _classifier(), mel_features)


def fit_text(texts: Sequence[str], labels: Sequence[str | None]) -> Recogniser | str:
    """Logistic regression on which words a text holds; a text with none of the training
    words is not recognised as anything (an empty caption is never right)."""
    words = CountVectorizer(lowercase=True, token_pattern=r"(?u)\b\w+\b", binary=True)
    try:
        words.fit([t for t, label in zip(texts, labels, strict=True) if label is not None])
    except ValueError:  # no word at all
        return "text: the training texts have no words"

    def abstain(inputs: Sequence[str]) -> np.ndarray:
        return np.asarray(words.transform(list(inputs)).sum(1)).ravel() == 0

    return _fit(
        "text", list(texts), labels, LogisticRegression(max_iter=2000), words.transform, abstain
    )


@dataclass
class Recognisers:
    """The judges of one workspace (fitted once per evaluation session): per medium a
    :class:`Recogniser`, or the reason there is none."""

    image: Recogniser | str
    audio: Recogniser | str
    text: Recogniser | str

    def get(self, medium: str) -> Recogniser | str:
        return getattr(self, medium)


def span_ids(sample: TokenSample, kind: str, layout: VocabLayout) -> Tensor | None:
    """Local ids of the first ``kind`` span ("image", "audio", "video", "text") of a sample,
    or None; a video's are its frames' image ids."""
    block = "image" if kind == "video" else kind
    for name, start, end in sample.meta["spans"]:
        if name == kind:
            return sample.tokens[start:end].long() - layout.offsets[block]
    return None


def fit_recognisers(
    tokenizers: Tokenizers, samples: dict[str, list[TokenSample]], batch: int = 64
) -> Recognisers:
    """Fit the three judges on labelled training samples of every bucket in ``samples``:
    images and audio clips from any span of theirs (``image2text`` instructions,
    ``text2image`` responses, ...), decoded by the tokenizers; texts decoded from text spans."""
    layout = tokenizers.layout
    images: list[tuple[Tensor, str | None]] = []
    clips: list[tuple[Tensor, str | None]] = []
    texts: list[tuple[str, str | None]] = []
    for bucket in sorted(samples):
        for sample in samples[bucket]:
            label = label_of(sample)
            if label is None:
                continue
            if (ids := span_ids(sample, "image", layout)) is not None and "video" not in bucket:
                images.append((ids, label))
            if (ids := span_ids(sample, "audio", layout)) is not None:
                clips.append((ids, label))
            if (ids := span_ids(sample, "text", layout)) is not None:
                texts.append((tokenizers.text.decode(ids.tolist()), label))
    fitted: dict[str, Recogniser | str] = {}
    by_length: dict[int, list[tuple[Tensor, str | None]]] = {}
    for ids, label in images:
        by_length.setdefault(len(ids), []).append((ids, label))
    if images:
        pixels, labels = [], []
        for group in by_length.values():
            for start in range(0, len(group), batch):
                chunk = group[start : start + batch]
                pixels.append(tokenizers.image.decode(torch.stack([c[0] for c in chunk])).cpu())
                labels += [c[1] for c in chunk]
        fitted["image"] = fit_image(torch.cat(pixels), labels)
    else:
        fitted["image"] = "image: no labelled training image"
    if clips:
        fitted["audio"] = fit_audio(
            [tokenizers.audio.decode(ids) for ids, _ in clips], [label for _, label in clips]
        )
    else:
        fitted["audio"] = "audio: no labelled training clip"
    fitted["text"] = (
        fit_text([t for t, _ in texts], [label for _, label in texts])
        if texts
        else "text: no labelled training text"
    )
    return Recognisers(**fitted)
