"""Numbers as English words, and the caption templates of the digits corpus.

Templates are picked per document from the builder's seeded generator, so a caption varies
across documents but the same seed always gives the same captions.
"""

from __future__ import annotations

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
          "eighteen", "nineteen")  # fmt: skip
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")

# {word}: "seven", {a_word}: "a seven" / "an eight", {digit}: "7"; every template names
# the digit exactly once, always as its third word. Why the fixed place: the DFM model fills
# a masked response position from its neighbours and the image, and at the demo's size it
# learns to read the image only where the digit sits at one offset of the response.
# Measured (image -> text alone on the demo's own tokens, 600 steps of 32, teacher-forced
# digit right): eight templates with the digit anywhere from the first to the sixth word
# 10% (chance, through 1,200 steps), these eight 43%, the first four 58% at 500 steps;
# the AR baseline learns both (benchmarks/caption_templates.py).
IMAGE_CAPTIONS = (
    "a handwritten {word}",
    "the digit {digit}",
    "a scanned {word}",
    "the number {word}, written by hand",
    "a handwritten {digit}",
    "the digit {word}",
    "a scanned {digit}, in grey ink",
    "the number {digit}",
)
# {direction}: "left", "right", "up" or "down".
VIDEO_CAPTIONS = (
    "a handwritten {word} drifting {direction}",
    "the digit {digit} moving {direction}",
    "a handwritten {word} sliding {direction}",
    "the digit {word} drifting {direction}",
)


def with_article(word: str) -> str:
    """The word with its article, chosen by sound: "a seven", "an eight", "a one"."""
    return f"an {word}" if word.startswith(("eight", "eleven")) else f"a {word}"


def fill(template: str, digit: int, **fields: str) -> str:
    """A caption template with ``digit`` as {word}, {a_word} and {digit}, and ``fields``."""
    word = DIGIT_WORDS[digit]
    return template.format(word=word, a_word=with_article(word), digit=digit, **fields)


def number_words(number: int) -> str:
    """``0 <= number < 100`` in words: 7 -> "seven", 42 -> "forty two", 90 -> "ninety"."""
    if not 0 <= number < 100:
        raise ValueError(f"number must lie in [0, 100), got {number}")
    if number < 10:
        return DIGIT_WORDS[number]
    if number < 20:
        return _TEENS[number - 10]
    tens, ones = divmod(number, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]} {DIGIT_WORDS[ones]}"
