"""Bucketed token sequences: exact layouts per bucket, spans, codes, limits and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from tokenization.sequences import (
    BUCKETS,
    SequenceConfig,
    Span,
    TokenizedSegment,
    TokenSequence,
    build_sequences,
)
from tokenization.vocab import MODALITY_CODES, VocabLayout

LAYOUT = VocabLayout(text_size=100, image_size=64, audio_size=32)  # image 111.., audio 175..
BOS, EOS, SEP, BOI, EOI, BOA, EOA, BOV, EOV = 100, 101, 104, 105, 106, 107, 108, 109, 110
BOTH = SequenceConfig()
ONE_WAY = SequenceConfig(both_directions=False)


def seg(modality: str, *ids: int) -> TokenizedSegment:
    return TokenizedSegment(modality, np.array(ids, dtype=np.int64))


def build(segments: list[TokenizedSegment], config: SequenceConfig = BOTH) -> dict:
    sequences, skipped = build_sequences(segments, LAYOUT, config)
    assert not skipped
    for sequence in sequences:
        check_invariants(sequence)
    return {s.bucket: s for s in sequences}


def check_invariants(sequence: TokenSequence) -> None:
    """Spans tile the sequence; codes agree with the layout; one BOS, one EOS at the ends."""
    assert sequence.bucket in BUCKETS
    assert sequence.tokens.dtype == np.int32 and sequence.modality.dtype == np.uint8
    assert sequence.tokens.shape == sequence.modality.shape
    position = 0
    for span in sequence.spans:
        assert span.start == position and span.end > span.start
        if span.kind == "special":
            assert span.end - span.start == 1
        position = span.end
    assert position == len(sequence.tokens)
    assert np.array_equal(sequence.modality, LAYOUT.modality_of(sequence.tokens))
    assert sequence.tokens[0] == BOS and sequence.tokens[-1] == EOS
    assert 1 <= sequence.instruction_length < len(sequence.tokens)
    starts = {span.start for span in sequence.spans}
    assert sequence.instruction_length in starts  # the boundary never cuts a span


def test_text_only_joins_texts_with_sep() -> None:
    out = build([seg("text", 1, 2), seg("text", 3)])
    assert list(out) == ["text"]
    sequence = out["text"]
    assert sequence.tokens.tolist() == [BOS, 1, 2, SEP, 3, EOS]
    assert sequence.instruction_length == 1
    assert sequence.spans == [
        Span("special", 0, 1),
        Span("text", 1, 3),
        Span("special", 3, 4),
        Span("text", 4, 5),
        Span("special", 5, 6),
    ]


def test_image_caption_gives_both_directions_exactly() -> None:
    out = build([seg("text", 5, 6), seg("image", 111, 112)])
    assert sorted(out) == ["image2text", "text2image"]
    to_text, from_text = out["image2text"], out["text2image"]
    assert to_text.tokens.tolist() == [BOS, BOI, 111, 112, EOI, 5, 6, EOS]
    assert to_text.instruction_length == 5
    assert to_text.modality.tolist() == [1, 1, 2, 2, 1, 0, 0, 1]
    assert from_text.tokens.tolist() == [BOS, 5, 6, BOI, 111, 112, EOI, EOS]
    assert from_text.instruction_length == 3
    assert [s.kind for s in from_text.spans] == [
        "special", "text", "special", "image", "special", "special",
    ]  # fmt: skip


def test_audio_with_texts_on_both_sides() -> None:
    out = build([seg("text", 1), seg("audio", 175, 206), seg("text", 2)])
    assert out["audio2text"].tokens.tolist() == [BOS, BOA, 175, 206, EOA, 1, SEP, 2, EOS]
    assert out["audio2text"].instruction_length == 5
    assert out["text2audio"].tokens.tolist() == [BOS, 1, SEP, 2, BOA, 175, 206, EOA, EOS]
    assert out["text2audio"].instruction_length == 4
    assert out["audio2text"].modality[2:4].tolist() == [MODALITY_CODES["audio"]] * 2


def test_video_uses_image_ids_and_code_with_video_markers_and_span() -> None:
    out = build([seg("video", 111, 120, 174), seg("text", 7)])
    to_text = out["video2text"]
    assert to_text.tokens.tolist() == [BOS, BOV, 111, 120, 174, EOV, 7, EOS]
    assert to_text.instruction_length == 6
    assert to_text.modality.tolist() == [1, 1, 2, 2, 2, 1, 0, 1]
    assert Span("video", 2, 5) in to_text.spans
    assert out["text2video"].tokens.tolist() == [BOS, 7, BOV, 111, 120, 174, EOV, EOS]


def test_one_direction_follows_the_document_order() -> None:
    media_first = build([seg("image", 111), seg("text", 1)], ONE_WAY)
    text_first = build([seg("text", 1), seg("audio", 175)], ONE_WAY)
    assert list(media_first) == ["image2text"]
    assert list(text_first) == ["text2audio"]


def test_interleaved_keeps_the_first_segment_as_instruction() -> None:
    document = [
        seg("text", 1),
        seg("image", 111),
        seg("text", 2),
        seg("text", 3),
        seg("audio", 180),
    ]
    sequence = build(document)["interleaved"]
    assert sequence.tokens.tolist() == [
        BOS, 1, BOI, 111, EOI, 2, SEP, 3, BOA, 180, EOA, EOS,
    ]  # fmt: skip
    assert sequence.instruction_length == 2
    assert [s.kind for s in sequence.spans][:4] == ["special", "text", "special", "image"]


def test_interleaved_with_media_first_and_no_sep_across_the_boundary() -> None:
    media_only = build([seg("image", 111), seg("image", 112)])["interleaved"]
    assert media_only.tokens.tolist() == [BOS, BOI, 111, EOI, BOI, 112, EOI, EOS]
    assert media_only.instruction_length == 4
    two_media = build([seg("text", 1), seg("text", 2), seg("image", 111), seg("audio", 175)])
    assert two_media["interleaved"].tokens.tolist()[:4] == [BOS, 1, 2, BOI]


def test_single_media_segment_is_all_response() -> None:
    sequence = build([seg("audio", 175, 176)])["interleaved"]
    assert sequence.tokens.tolist() == [BOS, BOA, 175, 176, EOA, EOS]
    assert sequence.instruction_length == 1


def test_empty_segments_are_dropped_and_empty_documents_reported() -> None:
    out = build([seg("text"), seg("image", 111), seg("text", 4)])
    assert sorted(out) == ["image2text", "text2image"]
    assert build_sequences([], LAYOUT, BOTH) == ([], ["empty_document"])
    assert build_sequences([seg("text")], LAYOUT, BOTH) == ([], ["empty_document"])


def test_max_tokens_skips_only_the_longer_sequences_with_reasons() -> None:
    document = [seg("text", 1, 2, 3), seg("image", 111, 112)]
    sequences, skipped = build_sequences(document, LAYOUT, SequenceConfig(max_tokens=9))
    assert [s.bucket for s in sequences] == ["image2text", "text2image"]
    sequences, skipped = build_sequences(document, LAYOUT, SequenceConfig(max_tokens=8))
    assert sequences == [] and skipped == ["too_long:image2text", "too_long:text2image"]
    with pytest.raises(ValidationError):
        SequenceConfig(max_tokens=0)
    with pytest.raises(ValidationError):
        SequenceConfig(max_len=3)


@pytest.mark.parametrize(
    "segment",
    [
        seg("text", 100),  # a special id is not text
        seg("text", -1),
        seg("image", 110),
        seg("image", 175),  # audio id in an image segment
        seg("video", 180),  # video ids live in the image range
        seg("audio", 207),  # past the end of the vocabulary
        seg("audio", 111),
        TokenizedSegment("text", np.array([1.0, 2.0])),
        TokenizedSegment("text", np.array([[1, 2]])),
        seg("subtitle", 1),
    ],
)
def test_out_of_range_or_malformed_ids_are_refused(segment: TokenizedSegment) -> None:
    with pytest.raises(ValueError):
        build_sequences([seg("text", 1), segment], LAYOUT, BOTH)
