"""``omni examples digits``: a learnable omnimodal corpus from data inside installed packages.

Four tasks, every document in the ``jsonl`` Document format with ``task``, ``split`` and
(where it has one class) ``label`` metadata:

* ``caption``: each of the 1,797 UCI digits (scikit-learn) as a PNG with a caption naming
  the digit; a fixed 1/6 of each digit's images is ``eval``;
* ``speech``: digits and numbers 10..99 spoken by eSpeak NG voices; the eval voices are
  never heard in train (``speech.EVAL_VARIANTS``);
* ``video``: a digit drifting across the frame for 8 frames, captioned with its direction;
  its split is its image's;
* ``interleaved``: sums ("three [3] plus four [4] makes seven [7]") and spoken + written
  forms of one digit; every 6th is ``eval`` and draws only eval images and voices.

Deterministic: one seeded generator per task, fixed-order synthesis and encoding, so the
same options give the same bytes in every file. The corpus is built in a hidden sibling
directory and moved into place at the end, so a failed build leaves ``--out`` as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.examples import speech, video
from pipelines.examples.images import DigitImages, ink, load_digit_images, png_bytes
from pipelines.examples.notices import licences_text, readme_text
from pipelines.examples.words import (
    DIGIT_WORDS,
    IMAGE_CAPTIONS,
    VIDEO_CAPTIONS,
    fill,
    with_article,
)

MARKER = ".omni-examples.json"  # names the corpus and its options; a rebuild may replace it
TASKS = ("caption", "speech", "video", "interleaved")
SPLITS = ("train", "eval")
INTERLEAVED_EVAL_EVERY = 6
UCI_LICENSE = "CC BY 4.0 (UCI ML Repository, Alpaydin & Kaynak)"


class CorpusBuildError(RuntimeError):
    """The corpus cannot be built where asked (``--out`` holds other files)."""


class InvalidOptions(CorpusBuildError):
    """An option is out of range; the message names it."""


@dataclass(frozen=True)
class DigitsOptions:
    """What to build; the defaults make about 4,300 documents in seconds."""

    image_size: int = 64
    seed: int = 0
    limit: int | None = None
    speech: bool = True
    clips_per_digit: int = 2
    numbers_per_voice: int = 4
    videos: int = 600
    sums: int = 600
    spoken_written: int = 400
    # Caption templates used, the first N of each task's (None: all). One template makes
    # the captions learnable by a small DFM run (README, "What the demo learns").
    caption_templates: int | None = None

    def check(self) -> None:
        if self.image_size < 16 or self.image_size % 2:
            raise InvalidOptions(f"--image-size must be even and >= 16, got {self.image_size}")
        if self.limit is not None and self.limit < 2:
            raise InvalidOptions(f"--limit must be >= 2 (one per split), got {self.limit}")
        if self.caption_templates is not None and self.caption_templates < 1:
            raise InvalidOptions(f"--caption-templates must be >= 1, got {self.caption_templates}")
        counts = ("clips_per_digit", "numbers_per_voice", "videos", "sums", "spoken_written")
        for name in counts:
            if getattr(self, name) < 0:
                flag = "--" + name.replace("_", "-")
                raise InvalidOptions(f"{flag} must be >= 0, got {getattr(self, name)}")


@dataclass
class DigitsReport:
    """What was built: documents per task and split, files, bytes and wall time."""

    out: Path
    counts: dict[str, dict[str, int]]
    files: int
    bytes: int
    seconds: float
    options: DigitsOptions = field(default_factory=DigitsOptions)

    @property
    def documents(self) -> int:
        return sum(sum(splits.values()) for splits in self.counts.values())


def build(out: Path, options: DigitsOptions | None = None) -> DigitsReport:
    """Build the digits corpus into ``out`` (created or replaced) and report its counts."""
    options = options or DigitsOptions()
    started = time.perf_counter()
    options.check()
    if options.speech:
        speech.require_espeak()
    out = Path(out).resolve()
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        documents = _write_corpus(staging, options)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    counts = {task: dict.fromkeys(SPLITS, 0) for task in TASKS}
    for document in documents:
        counts[document["task"]][document["split"]] += 1
    files = [path for path in out.rglob("*") if path.is_file()]
    return DigitsReport(
        out=out,
        counts=counts,
        files=len(files),
        bytes=sum(path.stat().st_size for path in files),
        seconds=time.perf_counter() - started,
        options=options,
    )


def _write_corpus(root: Path, options: DigitsOptions) -> list[dict[str, Any]]:
    """Every file of the corpus under ``root``; returns the documents of ``docs.jsonl``."""
    images = load_digit_images()
    media = _MediaWriter(root, images, options.image_size)
    clips = _speech_documents(options) if options.speech else []
    job = speech.SynthesisJob([clip for clip, _ in clips], root) if clips else None
    try:  # images and videos are drawn while the speech workers run
        documents = _caption_documents(images, media, options)
        documents += _video_documents(images, media, options)
        documents += [document for _, document in clips]
        documents += _interleaved_documents(images, media, clips, options)
        if job is not None:
            job.wait()
    finally:
        if job is not None:
            job.cancel()
    lines = "".join(json.dumps(document, ensure_ascii=False) + "\n" for document in documents)
    (root / "docs.jsonl").write_text(lines, encoding="utf-8")
    counts = Counter((document["task"], document["split"]) for document in documents)
    (root / "README.md").write_text(readme_text(asdict(options), counts), encoding="utf-8")
    (root / "LICENSES.md").write_text(licences_text(), encoding="utf-8")
    marker = {"corpus": "digits", "options": asdict(options)}
    (root / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return documents


def _rng(options: DigitsOptions, task: str) -> np.random.Generator:
    """One generator per task: turning speech off or limiting one task changes no other."""
    return np.random.default_rng([options.seed, TASKS.index(task)])


class _MediaWriter:
    """Writes each image once, when a document first refers to it, and the video clips."""

    def __init__(self, root: Path, images: DigitImages, side: int) -> None:
        self.root, self.images, self.side = root, images, side
        self._pixels = ink(images.cells, side)  # every digit at once: (N, side, side)
        self._glyph_side = round(side * 5 / 8 / 2) * 2  # the digit inside a video frame
        self._written: set[int] = set()
        for folder in ("images", "video"):
            (root / "media" / folder).mkdir(parents=True, exist_ok=True)

    def image(self, index: int) -> dict[str, str]:
        path = f"media/images/{index:04d}.png"
        if index not in self._written:
            (self.root / path).write_bytes(png_bytes(self._pixels[index]))
            self._written.add(index)
        return {"type": "image", "path": path}

    def glyphs(self, indices: list[int]) -> np.ndarray:
        """The digits ``indices`` drawn at the size they have inside a video frame."""
        return ink(self.images.cells[indices], self._glyph_side)

    def clip(self, number: int, glyph: np.ndarray, direction: str) -> dict[str, str]:
        path = f"media/video/{number:04d}.mp4"
        frames = video.drifting_frames(glyph, self.side, direction)
        (self.root / path).write_bytes(video.mp4_bytes(frames))
        return {"type": "video", "path": path}


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _document(native_id: str, task: str, split: str, label: str | None, **fields: Any) -> dict:
    """A Document line: id, the metadata every document has, then the rest, segments last."""
    head: dict[str, Any] = {"id": native_id, "task": task, "split": split}
    if label is not None:
        head["label"] = label
    segments = fields.pop("segments")
    return {**head, **fields, "segments": segments}


def limited(items: list[Any], limit: int | None, split_of: Callable[[Any], str]) -> list[Any]:
    """At most ``limit`` of ``items``, evenly spaced within each split, in their order.

    Each split keeps its share (at least one item while it has any), so a small build
    still has train and eval documents of every task.
    """
    if limit is None or len(items) <= limit:
        return items
    groups = {split: [i for i, item in enumerate(items) if split_of(item) == split]
              for split in SPLITS}  # fmt: skip
    wanted_eval = round(limit * len(groups["eval"]) / len(items))
    quota = {"eval": min(len(groups["eval"]), max(1 if groups["eval"] else 0, wanted_eval))}
    quota["train"] = min(len(groups["train"]), limit - quota["eval"])
    kept = set()
    for split, members in groups.items():
        if quota[split]:
            picks = np.rint(np.linspace(0, len(members) - 1, quota[split])).astype(int)
            kept.update(members[p] for p in picks)
    return [item for i, item in enumerate(items) if i in kept]


def _templates(templates: tuple[str, ...], options: DigitsOptions) -> int:
    """How many of a task's caption templates to draw from (the first ones)."""
    return min(len(templates), options.caption_templates or len(templates))


def _caption_documents(
    images: DigitImages, media: _MediaWriter, options: DigitsOptions
) -> list[dict[str, Any]]:
    rng = _rng(options, "caption")
    templates = rng.integers(_templates(IMAGE_CAPTIONS, options), size=len(images.labels))
    indices = limited(list(range(len(images.labels))), options.limit, images.split.__getitem__)
    documents = []
    for index in indices:
        digit = int(images.labels[index])
        caption = fill(IMAGE_CAPTIONS[templates[index]], digit)
        documents.append(
            _document(
                f"caption-{index:04d}",
                "caption",
                str(images.split[index]),
                str(digit),
                source=f"UCI handwritten digits #{index} (sklearn.datasets.load_digits)",
                license=UCI_LICENSE,
                segments=[media.image(index), _text(caption)],
            )
        )
    return documents


def _speech_documents(options: DigitsOptions) -> list[tuple[speech.SpeechClip, dict]]:
    """The clips to synthesise, each with its document (audio, then its transcript)."""
    rng = _rng(options, "speech")
    planned = speech.plan_clips(rng, options.clips_per_digit, options.numbers_per_voice)
    planned = limited(planned, options.limit, lambda item: item[0].split)
    pairs = []
    for clip, label in planned:
        native_id = "speech-" + Path(clip.path).stem
        document = _document(
            native_id,
            "speech",
            clip.split,
            label,
            voice=clip.voice,
            variant=clip.variant,
            rate=clip.rate,
            pitch=clip.pitch,
            source=f"eSpeak NG voice {clip.voice}, {clip.rate} wpm, pitch {clip.pitch}",
            license="CC BY 4.0 (generated; see LICENSES.md)",
            segments=[{"type": "audio", "path": clip.path}, _text(clip.text)],
        )
        pairs.append((clip, document))
    return pairs


def _video_documents(
    images: DigitImages, media: _MediaWriter, options: DigitsOptions
) -> list[dict[str, Any]]:
    rng = _rng(options, "video")
    count = min(options.videos, len(images.labels))
    sources = np.sort(rng.choice(len(images.labels), size=count, replace=False))
    directions = rng.integers(len(video.DIRECTIONS), size=count)
    templates = rng.integers(_templates(VIDEO_CAPTIONS, options), size=count)
    planned = limited(list(range(count)), options.limit, lambda k: images.split[sources[k]])
    glyphs = media.glyphs([int(sources[number]) for number in planned])
    documents = []
    for number, glyph in zip(planned, glyphs, strict=True):
        index, direction = int(sources[number]), video.DIRECTIONS[directions[number]]
        digit = int(images.labels[index])
        caption = fill(VIDEO_CAPTIONS[templates[number]], digit, direction=direction)
        documents.append(
            _document(
                f"video-{number:04d}",
                "video",
                str(images.split[index]),
                str(digit),
                direction=direction,
                source=f"UCI handwritten digits #{index}, drifting {direction}",
                license=UCI_LICENSE,
                segments=[media.clip(number, glyph, direction), _text(caption)],
            )
        )
    return documents


_JOINS = (("plus", "makes"), ("plus", "is"), ("and", "make"), ("added to", "gives"))


def _interleaved_documents(
    images: DigitImages,
    media: _MediaWriter,
    clips: list[tuple[speech.SpeechClip, dict]],
    options: DigitsOptions,
) -> list[dict[str, Any]]:
    """Sums of digits, then spoken + written digits (when there is speech)."""
    rng = _rng(options, "interleaved")
    spoken = {split: [(clip, doc) for clip, doc in clips
                      if clip.split == split and len(doc["label"]) == 1]
              for split in SPLITS}  # fmt: skip
    plans = list(_sum_plans(rng, options.sums))
    spoken_plans = _spoken_plans(rng, options.spoken_written, len(plans))
    plans += [plan for plan in spoken_plans if spoken[plan[1]]]  # no voice of its split: none
    plans = limited(plans, options.limit, lambda plan: plan[1])
    documents = []
    for number, (kind, split, draw) in enumerate(plans):
        if kind == "sum":
            documents.append(_sum_document(number, split, draw, images, media, rng))
        else:
            documents.append(_spoken_document(number, split, draw, images, media, spoken, rng))
    return documents


def _split_of_interleaved(number: int) -> str:
    return "eval" if number % INTERLEAVED_EVAL_EVERY == INTERLEAVED_EVAL_EVERY - 1 else "train"


def _sum_plans(rng: np.random.Generator, count: int) -> Iterator[tuple[str, str, tuple]]:
    pairs = [(a, b) for a in range(10) for b in range(10 - a)]  # a + b <= 9: one image each
    for number in range(count):
        a, b = pairs[rng.integers(len(pairs))]
        yield "sum", _split_of_interleaved(number), (a, b, int(rng.integers(len(_JOINS))))


def _spoken_plans(
    rng: np.random.Generator, count: int, offset: int
) -> Iterator[tuple[str, str, tuple]]:
    for number in range(count):
        yield "spoken", _split_of_interleaved(offset + number), (int(rng.integers(3)),)


def _pick_image(images: DigitImages, digit: int, split: str, rng: np.random.Generator) -> int:
    pool = images.indices(digit, split)
    return int(pool[rng.integers(len(pool))])


def _sum_document(
    number: int, split: str, draw: tuple, images: DigitImages, media: _MediaWriter,
    rng: np.random.Generator,
) -> dict[str, Any]:  # fmt: skip
    """Words and images of one split: "three [3] plus four [4] makes seven [7]"."""
    a, b, join = draw
    total = a + b
    plus, makes = _JOINS[join]
    shown = [media.image(_pick_image(images, digit, split, rng)) for digit in (a, b, total)]
    segments = [_text(DIGIT_WORDS[a]), shown[0], _text(f"{plus} {DIGIT_WORDS[b]}"), shown[1],
                _text(f"{makes} {DIGIT_WORDS[total]}"), shown[2]]  # fmt: skip
    return _document(
        f"interleaved-{number:04d}",
        "interleaved",
        split,
        None,
        kind="sum",
        digits=[a, b, total],
        source="UCI handwritten digits (sklearn.datasets.load_digits)",
        license=UCI_LICENSE,
        segments=segments,
    )


def _spoken_document(
    number: int, split: str, draw: tuple, images: DigitImages, media: _MediaWriter,
    spoken: dict[str, list[tuple[speech.SpeechClip, dict]]], rng: np.random.Generator,
) -> dict[str, Any]:  # fmt: skip
    """One digit heard (a single-digit clip of the document's split) and seen (an image)."""
    pool = spoken[split]
    clip, doc = pool[rng.integers(len(pool))]
    digit = int(doc["label"])
    word = DIGIT_WORDS[digit]
    heard = {"type": "audio", "path": clip.path}
    seen = media.image(_pick_image(images, digit, split, rng))
    (layout,) = draw
    if layout == 0:
        segments = [heard, _text(f"sounds like {word} and looks like"), seen]
    elif layout == 1:
        segments = [_text(f"{word}, spoken"), heard, _text("and written"), seen]
    else:
        segments = [seen, _text(f"is {with_article(word)}, which sounds like"), heard]
    return _document(
        f"interleaved-{number:04d}",
        "interleaved",
        split,
        str(digit),
        kind="spoken_written",
        voice=clip.voice,
        variant=clip.variant,
        source=f"UCI handwritten digits and eSpeak NG voice {clip.voice}",
        license="CC BY 4.0 (see LICENSES.md)",
        segments=segments,
    )


def _check_replaceable(out: Path) -> None:
    """``out`` may be missing, empty, or an earlier build of this command; nothing else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CorpusBuildError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise CorpusBuildError(
            f"{out} is not empty and is not a corpus built by `omni examples`: "
            "choose another --out, or empty it first"
        )


def _move_into_place(staging: Path, out: Path) -> None:
    """Swap the finished build in; an earlier build is removed only once it is replaced."""
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a corpus is read by others
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
        out.rename(previous)
    staging.rename(out)
    if previous is not None:
        shutil.rmtree(previous)
