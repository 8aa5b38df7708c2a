"""The README and LICENSES files written into a built digits corpus.

Both are generated from the build's options and counts only (no dates, no timings), so
they are as deterministic as the media.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipelines.examples.speech import EVAL_VARIANTS, TRAIN_VARIANTS
from pipelines.examples.words import IMAGE_CAPTIONS, VIDEO_CAPTIONS

_FLAGS = {
    "image_size": "--image-size",
    "seed": "--seed",
    "limit": "--limit",
    "clips_per_digit": "--clips-per-digit",
    "numbers_per_voice": "--numbers-per-voice",
    "videos": "--videos",
    "sums": "--sums",
    "spoken_written": "--spoken-written",
}


def command_line(options: dict[str, Any]) -> str:
    """The ``omni examples digits`` command that rebuilds this corpus byte for byte."""
    parts = ["omni examples digits --out DIR"]
    parts += [f"{flag} {options[name]}" for name, flag in _FLAGS.items()
              if options[name] is not None]  # fmt: skip
    if not options["speech"]:
        parts.append("--no-speech")
    return " ".join(parts)


def readme_text(options: dict[str, Any], counts: Counter) -> str:
    """README.md: what the corpus holds, how it was made, how its splits are drawn."""
    rows = []
    for task in ("caption", "speech", "video", "interleaved"):
        train, held = counts.get((task, "train"), 0), counts.get((task, "eval"), 0)
        rows.append(f"| {task} | {train} | {held} | {train + held} |")
    total_train = sum(n for (_, split), n in counts.items() if split == "train")
    total_eval = sum(n for (_, split), n in counts.items() if split == "eval")
    rows.append(f"| all | {total_train} | {total_eval} | {total_train + total_eval} |")
    table = "\n".join(rows)
    chosen = options.get("caption_templates")

    def templates(available: int) -> str:
        used = min(available, chosen or available)
        return "one template" if used == 1 else f"{used} templates"

    return f"""# Digits: a learnable omnimodal corpus

Built by `{command_line(options)}` (the same command gives the same bytes).
`docs.jsonl` holds one Document per line in the `jsonl` format of the omni-dfm pipeline
(media paths relative to this directory); `media/` holds the images (PNG, grayscale,
{options["image_size"]} px), speech (WAV, 16 kHz mono 16-bit) and videos (H.264 MP4, 8 frames).

| task | train | eval | all |
| --- | --- | --- | --- |
{table}

## Documents

Every document has `id`, `task`, `split` (`train` or `eval`) and `segments`; documents of
one class also have `label`, the number as digits (`"7"`, or `"42"` for a spoken 42).

- `caption`: a handwritten digit and a caption naming it ("a handwritten seven", "the
  digit 7", ...: {templates(len(IMAGE_CAPTIONS))}; the digit is always the third word).
- `speech`: a clip of a digit or a number from 10 to 99 and its transcript ("seven",
  "forty two"); also `voice` (eSpeak accent + variant), `variant`, `rate` (words per
  minute) and `pitch`.
- `video`: a digit drifting `left`, `right`, `up` or `down` over 8 frames and its caption
  ("a handwritten seven drifting left", ...: {templates(len(VIDEO_CAPTIONS))}); also `direction`.
- `interleaved`: `kind` `sum` ("three [image] plus four [image] makes seven [image]",
  `digits` [a, b, a + b], no label) or `spoken_written` (one digit heard and seen, with
  `label` and `voice`).

## Splits

- Images: every 6th image of each digit, in scikit-learn's order, is `eval` (1/6); the
  split does not depend on `--seed`.
- Speech: by voice. The eSpeak variants {", ".join(EVAL_VARIANTS)} speak only `eval`
  clips; {", ".join(TRAIN_VARIANTS)} only `train` clips. Accents (en, en-us, en-gb-scotland,
  ...) are drawn per clip from one shared list.
- Video: the split of the image it moves.
- Interleaved: every 6th document is `eval` and draws only `eval` images and voices.

The pipeline's `pretokenize` keeps the declared `split` and copies `label` into every
token sample's `meta.json`. Licences: LICENSES.md.
"""


def licences_text() -> str:
    """LICENSES.md: the sources, their licences and the terms of the generated data."""
    return """# Licences

## Sources

- **UCI Optical Recognition of Handwritten Digits** (E. Alpaydin, C. Kaynak, 1998;
  UCI Machine Learning Repository, https://doi.org/10.24432/C50P49), licensed under
  Creative Commons Attribution 4.0 International (CC BY 4.0). Read through the copy that
  scikit-learn ships (`sklearn.datasets.load_digits`: 1,797 images of 8x8; scikit-learn
  itself is BSD-3-Clause). The images and video frames here are adaptations: upscaled,
  smoothed and contrast-curved, and moved across the frame.
- **eSpeak NG** (GPL-3.0-or-later), from the `espeakng-loader` wheel (the optional
  `examples` extra of omni-dfm). It was only run, to synthesise the speech clips; no part
  of eSpeak NG (code or voice data) is in this corpus. The GPL governs the program, not the
  sound it produces from text written by the corpus builder.
- The videos were encoded with libx264 through PyAV (FFmpeg); like eSpeak NG, used as a
  tool, nothing of it is in the corpus beyond the encoded streams.

## Terms of this corpus

The corpus as a whole is distributed under **CC BY 4.0**, as it adapts the UCI digits.
Attribution: "Digits corpus generated by omni-dfm from the UCI Optical Recognition of
Handwritten Digits data set (Alpaydin & Kaynak, 1998, CC BY 4.0), with speech synthesised
by eSpeak NG." The speech clips and transcripts contain no third-party data.
"""
