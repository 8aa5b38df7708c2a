"""Token sequences per training bucket: one tokenized document -> instruction + response.

Pure functions, no I/O. A document arrives as :class:`TokenizedSegment` s (unified ids,
media not wrapped yet); :func:`build_sequences` turns it into one :class:`TokenSequence` per
training task. The instruction (``[0, instruction_length)``) stays clean during discrete
flow matching; the response is what the model learns to denoise.

Rules:

* Every sequence starts with ``<BOS>``; the response ends with ``<EOS>``. Media are wrapped:
  image ``<BOI> ids <EOI>``, audio ``<BOA> ids <EOA>``, video ``<BOV> ids <EOV>`` (a video is
  its frames' image ids). Consecutive text segments in one part (instruction or response)
  are joined with ``<SEP>``; nothing is inserted across the instruction/response boundary.
* Text only -> ``text``: instruction ``<BOS>``, response ``texts <EOS>``.
* Exactly one media segment of type X and at least one text segment -> ``X2text``
  (instruction ``<BOS>`` + wrapped media, response ``texts <EOS>``) and ``text2X``
  (instruction ``<BOS> texts``, response wrapped media + ``<EOS>``). With
  ``both_directions=False`` only one is built: media first in the document -> ``X2text``,
  text first -> ``text2X``.
* Anything else (two or more media, or media without text) -> ``interleaved``: instruction
  ``<BOS>`` + the first segment (wrapped if media), response the remaining segments in order
  + ``<EOS>``. A single media segment alone: instruction ``<BOS>``, response wrapped media +
  ``<EOS>``.
* ``spans`` cover every position exactly once, in order; each special token is its own
  ``"special"`` span. Modality codes (:data:`~tokenization.vocab.MODALITY_CODES`): text 0,
  special 1 (markers included), image 2 (video frames too), audio 3.
* Segments with no ids are dropped; a document left with none is reported as
  ``"empty_document"``. A sequence longer than ``max_tokens`` is not built and reported as
  ``"too_long:<bucket>"``. Ids outside their modality's range raise ``ValueError``.

Worked example, layout ``text_size=100`` (specials at 100..110: ``<BOS>`` 100, ``<EOS>`` 101,
``<SEP>`` 104, ``<BOI>`` 105, ``<EOI>`` 106), image ids from 111; document
``[text (5, 6), image (111, 112)]``:

    text2image: tokens [100, 5, 6, 105, 111, 112, 106, 101]   instruction_length 3
                spans  special[0,1) text[1,3) special[3,4) image[4,6) special[6,7) special[7,8)
    image2text: tokens [100, 105, 111, 112, 106, 5, 6, 101]   instruction_length 5
                modality [1, 1, 2, 2, 1, 0, 0, 1]

With ``both_directions=False`` only ``text2image`` is built (the text comes first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tokenization.config import SequenceConfig
from tokenization.vocab import MODALITY_CODES, VocabLayout

BUCKETS = (
    "text", "image2text", "text2image", "audio2text", "text2audio",
    "video2text", "text2video", "interleaved",
)  # fmt: skip

MEDIA_MARKERS: dict[str, tuple[str, str]] = {
    "image": ("<BOI>", "<EOI>"),
    "audio": ("<BOA>", "<EOA>"),
    "video": ("<BOV>", "<EOV>"),
}
# The vocabulary block (and modality code) of each segment modality.
_BLOCK = {"text": "text", "image": "image", "audio": "audio", "video": "image"}


@dataclass(frozen=True)
class TokenizedSegment:
    """One document segment: ``ids`` (n,) int64 unified ids, media not wrapped yet."""

    modality: str  # "text" | "image" | "audio" | "video"
    ids: np.ndarray


@dataclass(frozen=True)
class Span:
    """Half-open positions ``[start, end)`` of one part of a sequence."""

    kind: str  # "text" | "image" | "audio" | "video" | "special"
    start: int
    end: int


@dataclass
class TokenSequence:
    """One training sample: ``tokens`` (L,) int32 unified ids, ``modality`` (L,) uint8 codes."""

    bucket: str
    tokens: np.ndarray
    modality: np.ndarray
    instruction_length: int
    spans: list[Span] = field(default_factory=list)


class _Builder:
    """Appends parts to one sequence, keeping tokens, modality codes and spans in step."""

    def __init__(self, layout: VocabLayout) -> None:
        self.layout = layout
        self.tokens: list[np.ndarray] = []
        self.codes: list[np.ndarray] = []
        self.spans: list[Span] = []
        self.length = 0

    def _add(self, kind: str, ids: np.ndarray, code: int) -> None:
        self.tokens.append(ids)
        self.codes.append(np.full(len(ids), code, dtype=np.uint8))
        self.spans.append(Span(kind, self.length, self.length + len(ids)))
        self.length += len(ids)

    def special(self, token: str) -> None:
        ids = np.array([self.layout.special_id(token)], dtype=np.int64)
        self._add("special", ids, MODALITY_CODES["special"])

    def part(self, segments: list[TokenizedSegment]) -> None:
        """Segments in order: media wrapped, consecutive texts joined with ``<SEP>``."""
        for index, segment in enumerate(segments):
            code = MODALITY_CODES[_BLOCK[segment.modality]]
            if segment.modality == "text":
                if index and segments[index - 1].modality == "text":
                    self.special("<SEP>")
                self._add("text", segment.ids, code)
                continue
            begin, end = MEDIA_MARKERS[segment.modality]
            self.special(begin)
            self._add(segment.modality, segment.ids, code)
            self.special(end)

    def build(self, bucket: str, instruction_length: int) -> TokenSequence:
        return TokenSequence(
            bucket=bucket,
            tokens=np.concatenate(self.tokens).astype(np.int32),
            modality=np.concatenate(self.codes),
            instruction_length=instruction_length,
            spans=self.spans,
        )


def _checked(segment: TokenizedSegment, layout: VocabLayout) -> TokenizedSegment:
    """The segment with ids as (n,) int64, or ValueError if any id is outside its block."""
    if segment.modality not in _BLOCK:
        raise ValueError(f"unknown segment modality {segment.modality!r}")
    ids = np.asarray(segment.ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"{segment.modality} ids must be a 1-D integer array, got {ids.dtype}")
    block = _BLOCK[segment.modality]
    low = layout.offsets[block]
    high = low + layout.sizes[block]
    if ids.size and (ids.min() < low or ids.max() >= high):
        raise ValueError(
            f"{segment.modality} ids must lie in [{low}, {high}), got [{ids.min()}, {ids.max()}]"
        )
    return TokenizedSegment(segment.modality, ids.astype(np.int64))


def _plans(
    segments: list[TokenizedSegment], both_directions: bool
) -> list[tuple[str, list[TokenizedSegment], list[TokenizedSegment]]]:
    """(bucket, instruction segments, response segments) for each sequence to build."""
    texts = [s for s in segments if s.modality == "text"]
    media = [s for s in segments if s.modality != "text"]
    if not media:
        return [("text", [], texts)]
    if len(media) == 1 and texts:
        kind = media[0].modality
        to_text = (f"{kind}2text", media, texts)
        from_text = (f"text2{kind}", texts, media)
        if both_directions:
            return [to_text, from_text]
        return [to_text if segments[0].modality != "text" else from_text]
    if len(segments) == 1:
        return [("interleaved", [], segments)]
    return [("interleaved", segments[:1], segments[1:])]


def build_sequences(
    segments: list[TokenizedSegment], layout: VocabLayout, config: SequenceConfig
) -> tuple[list[TokenSequence], list[str]]:
    """One document -> its bucketed sequences, and the reasons for those not built."""
    kept = [s for s in (_checked(s, layout) for s in segments) if s.ids.size]
    if not kept:
        return [], ["empty_document"]
    sequences: list[TokenSequence] = []
    skipped: list[str] = []
    for bucket, instruction, response in _plans(kept, config.both_directions):
        builder = _Builder(layout)
        builder.special("<BOS>")
        builder.part(instruction)
        instruction_length = builder.length
        builder.part(response)
        builder.special("<EOS>")
        if config.max_tokens is not None and builder.length > config.max_tokens:
            skipped.append(f"too_long:{bucket}")
            continue
        sequences.append(builder.build(bucket, instruction_length))
    return sequences, skipped
