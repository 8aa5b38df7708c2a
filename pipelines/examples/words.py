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
# the digit exactly once.
IMAGE_CAPTIONS = (
    "a handwritten {word}",
    "the digit {digit}",
    "a picture of the number {word}",
    "a handwritten digit {digit}",
    "the number {word}, written by hand",
    "an image of {a_word}",
    "a scanned {word}",
    "{word}",
)
# {direction}: "left", "right", "up" or "down".
VIDEO_CAPTIONS = (
    "{a_word} drifting {direction}",
    "the digit {digit} moving {direction}",
    "a handwritten {word} sliding {direction}",
    "{a_word} that drifts {direction}",
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
