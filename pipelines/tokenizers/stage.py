"""``omni tokenizers train | eval``: warm the tokenizers up on the shards, and measure them.

train: reads ``<workspace>/shards/``, trains the BPE text tokenizer on every text, then the
image tokenizer (images and sampled video frames, with captions) and the audio tokenizer
(clips with transcripts) for a step and time budget, measures held-out quality before and
after, logs it all to MLflow (losses, usage, reconstruction grids) and saves
``<workspace>/tokenizers/`` with ``_SUCCESS.json`` last.
eval: loads the saved tokenizers and reports reconstruction quality on any media folder.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import soundfile
import torch

from infra.config import fingerprint
from infra.storage import Storage, join
from infra.tracking import tracked_run
from pipelines.corpus import absolute
from pipelines.shard.documents import corpus_metadata, extension_of, media_type_of
from pipelines.stage_state import (
    SUCCESS,
    begin_stage,
    read_marker,
    read_parquet,
    success_payload,
    write_marker,
)
from tokenization.audio import AudioTokenizer, decode_audio
from tokenization.baselines import palette_quality
from tokenization.bundle import Tokenizers
from tokenization.errors import TokenizerInputError
from tokenization.image import ImageTokenizer
from tokenization.text import TextTokenizer
from tokenization.video import VideoTokenizer, read_frames
from tokenization.warmup import (
    AudioSample,
    ImageSample,
    LoopBudget,
    WarmupData,
    distinct,
    evaluate_audio,
    evaluate_images,
    reconstruction_grid,
    train_audio,
    train_images,
)

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig

STAGE = "tokenizers"


@dataclass
class TokenizersReport:
    """What a warm-up did: data used, steps run, quality before and after."""

    stage_dir: str
    skipped: bool
    texts: int = 0
    images: tuple[int, int] = (0, 0)  # (train, held out)
    audio: tuple[int, int] = (0, 0)
    rejected_media: dict[str, int] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    # the trivial codecs of the same token budget on the same held-out media: the bar
    palette: dict[str, float] = field(default_factory=dict)
    vocab_size: int = 0
    run_id: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _held_out(medium: bytes, fraction: float) -> bool:
    """Deterministic split by medium content: the same media are held out on every run.

    Not by document: the sample corpus reuses one photo or clip in up to three documents
    (caption, question, interleaved), so a split by document id put 20 of its 28 "held-out"
    images into training too, and PSNR measured memorisation, not generalisation.
    """
    bucket = int(hashlib.sha1(medium).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def _documents(storage: Storage, shards_dir: str) -> Iterator[dict[str, Any]]:
    manifest = read_parquet(storage, join(shards_dir, "manifest.parquet"))
    for path in manifest["path"].to_pylist():
        yield from read_parquet(storage, join(shards_dir, path)).to_pylist()


def _nearest_text(segments: list[dict[str, Any]], position: int) -> str | None:
    """The caption of a medium: the next text segment, else the previous one."""
    after = [s["text"] for s in segments[position + 1 :] if s["type"] == "text"]
    before = [s["text"] for s in segments[:position] if s["type"] == "text"]
    return after[0] if after else (before[-1] if before else None)


def collect(
    documents: Iterator[dict[str, Any]],
    image: ImageTokenizer,
    audio: AudioTokenizer,
    video: VideoTokenizer,
    eval_fraction: float,
    source_scale: int = 1,
) -> tuple[WarmupData, Counter[str]]:
    """Turn shard documents into warm-up samples; media a tokenizer refuses are counted.

    Video frames train the image tokenizer too: a video is tokenized as its frames. A medium
    is held out (by its bytes) wherever it occurs, so no held-out medium is ever trained on;
    a document that declares its split (metadata ``split``: train/eval, as pretokenize
    honours it) puts its media on that side instead, so e.g. held-out voices are never heard
    by the tokenizer either (the corpus keeps each medium on one side).
    With ``source_scale`` > 1 every training image and frame also keeps a ``source`` at that
    many times the tokenizer's resolution, for the warm-up's random crops.
    """
    data, rejected = WarmupData(), Counter()
    side = image.config.resolution * source_scale if source_scale > 1 else None
    for document in documents:
        segments = document["segments"]
        declared = corpus_metadata(document).get("split")
        for position, segment in enumerate(segments):
            kind = segment["type"]
            held_out = kind != "text" and (
                declared == "eval"
                if declared in ("train", "eval")
                else _held_out(segment["bytes"] or b"", eval_fraction)
            )
            images = data.eval_images if held_out else data.train_images
            clips = data.eval_audio if held_out else data.train_audio
            try:
                if kind == "text":
                    data.texts.append(segment["text"])
                elif kind == "image":
                    pixels = image.preprocess(segment["bytes"])
                    source = (
                        None
                        if held_out or side is None
                        else image.preprocess(segment["bytes"], side)
                    )
                    images.append(ImageSample(pixels, _nearest_text(segments, position), source))
                elif kind == "video":
                    caption = _nearest_text(segments, position)
                    frames = read_frames(segment["bytes"], video.frames)
                    pixels = video.frames_to_pixels(frames)
                    sources = [None] * len(pixels)
                    if not held_out and side is not None:
                        sources = list(video.frames_to_pixels(frames, side))
                    images += [
                        ImageSample(f, caption, s) for f, s in zip(pixels, sources, strict=True)
                    ]
                elif kind == "audio":
                    mel = audio.preprocess(*decode_audio(segment["bytes"]))
                    clips.append(AudioSample(mel, _nearest_text(segments, position)))
            except TokenizerInputError as error:
                rejected[f"{kind}: {str(error).split(':')[0]}"] += 1
    return data, rejected


def _publish(storage: Storage, local: Path, target: str) -> None:
    """Copy a saved tokenizer folder to the workspace (a no-op copy when it is local)."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes(join(target, str(path.relative_to(local))), path.read_bytes())


def run(config: PipelineConfig) -> TokenizersReport:
    """Warm the tokenizers up on the shards; skipped when already done with this config."""
    started = time.time()
    storage = Storage(config.storage)
    workspace = absolute(config.workspace)
    shards_dir, stage_dir = join(workspace, "shards"), join(workspace, STAGE)
    shards_done = read_marker(storage, shards_dir, SUCCESS)
    if shards_done is None:
        raise FileNotFoundError(f"{shards_dir}/_SUCCESS.json not found: run `omni shard` first")
    stage_fingerprint = fingerprint(STAGE, config.tokenizers, shards_done["fingerprint"])
    start = begin_stage(storage, stage_dir, stage_fingerprint)
    if success := start.done:
        return TokenizersReport(
            stage_dir,
            True,
            before=success["before"],
            after=success["after"],
            palette=success.get("palette", {}),
            vocab_size=success["vocab_size"],
            run_id=success.get("run_id"),
            seconds=time.time() - started,
            notes=["already done with this config: nothing to do"],
        )

    settings = config.tokenizers
    warmup = settings.warmup
    torch.manual_seed(warmup.seed)
    device = _device(warmup.device)
    image = ImageTokenizer.from_config(settings.image).to(device)
    audio = AudioTokenizer.from_config(settings.audio).to(device)
    video = VideoTokenizer(image, settings.video)
    data, rejected = collect(
        _documents(storage, shards_dir),
        image,
        audio,
        video,
        warmup.eval_fraction,
        settings.image_trainer.source_scale,
    )
    # The held-out media measure quality before and after; a few hundred tell it as well as
    # thousands (1,800 digit images held out 15%: encoding them twice took minutes).
    data.eval_images = data.eval_images[: warmup.max_eval_media]
    data.eval_audio = data.eval_audio[: warmup.max_eval_media]
    text = TextTokenizer.from_config(settings.text, data.texts)
    # The caption encoders of the warm-up objectives read the BPE ids just trained.
    image_trainer = settings.image_trainer.model_copy(update={"text_vocab_size": text.vocab_size})
    audio_trainer = settings.audio_trainer.model_copy(update={"text_vocab_size": text.vocab_size})
    report = TokenizersReport(
        stage_dir,
        False,
        texts=len(data.texts),
        images=(len(data.train_images), len(data.eval_images)),
        audio=(len(data.train_audio), len(data.eval_audio)),
        rejected_media=dict(rejected),
        notes=start.notes,
    )
    with tracked_run(config.mlflow, workspace, "tokenizers-warmup", {"stage": STAGE}) as tracker:
        tracker.log_params(settings, prefix="tokenizers.")
        report.run_id = tracker.run_id
        report.before = {
            **evaluate_images(image, data.eval_images),
            **evaluate_audio(audio, data.eval_audio),
        }
        tracker.log_metrics({f"before/{k}": v for k, v in report.before.items()}, step=0)
        if data.eval_images:
            tracker.log_bytes(reconstruction_grid(image, data.eval_images), "before.png", "images")
        total_steps = max(1, warmup.image_steps + warmup.audio_steps)
        seconds = warmup.max_seconds or float("inf")
        image_deadline = time.monotonic() + seconds * warmup.image_steps / total_steps
        budget = LoopBudget(
            warmup.image_steps,
            warmup.image_batch,
            warmup.seed,
            image_deadline,
            tracker.log_metrics,
            warmup.log_every,
            warmup.max_initialise_media,
        )
        report.steps["image"] = train_images(image, image_trainer, data.train_images, text, budget)
        audio_deadline = time.monotonic() + seconds * warmup.audio_steps / total_steps
        budget = LoopBudget(
            warmup.audio_steps,
            warmup.audio_batch,
            warmup.seed,
            audio_deadline,
            tracker.log_metrics,
            warmup.log_every,
            warmup.max_initialise_media,
        )
        report.steps["audio"] = train_audio(audio, audio_trainer, data.train_audio, text, budget)
        report.after = {
            **evaluate_images(image, data.eval_images),
            **evaluate_audio(audio, data.eval_audio),
        }
        tracker.log_metrics({f"after/{k}": v for k, v in report.after.items()}, step=0)
        report.palette = palette_baseline(data, data.eval_images, data.eval_audio, image, audio)
        tracker.log_metrics({f"palette/{k}": v for k, v in report.palette.items()}, step=0)
        if data.eval_images:
            tracker.log_bytes(reconstruction_grid(image, data.eval_images), "after.png", "images")
        tokenizers = Tokenizers(text, image.eval(), audio.eval(), video)
        report.vocab_size = tokenizers.layout.size
        with tempfile.TemporaryDirectory() as scratch:
            tokenizers.save(scratch)
            _publish(storage, Path(scratch), stage_dir)
        tracker.set_tags(
            {"tokenizers.uri": stage_dir, "vocab.fingerprint": tokenizers.layout.fingerprint()}
        )
    report.seconds = time.time() - started
    write_marker(
        storage,
        stage_dir,
        SUCCESS,
        success_payload(
            STAGE,
            stage_fingerprint,
            started,
            before=report.before,
            after=report.after,
            palette=report.palette,
            steps=report.steps,
            vocab_size=report.vocab_size,
            run_id=report.run_id,
            layout=tokenizers.layout.fingerprint(),
            rejected_media=report.rejected_media,
        ),
    )
    return report


def load_tokenizers(config: PipelineConfig, device: str = "cpu") -> Tokenizers:
    """The tokenizers saved by ``omni tokenizers train`` in this config's workspace."""
    storage = Storage(config.storage)
    stage_dir = join(absolute(config.workspace), STAGE)
    if read_marker(storage, stage_dir, SUCCESS) is None:
        raise FileNotFoundError(f"{stage_dir}/_SUCCESS.json not found: run `omni tokenizers train`")
    return Tokenizers.load_uri(storage, stage_dir, device)


def read_media(
    media_dir: Path, image: ImageTokenizer, audio: AudioTokenizer, video: VideoTokenizer
) -> tuple[list[ImageSample], list[AudioSample], Counter[str], dict[str, str]]:
    """Every medium under ``media_dir`` as samples (a video as its frames): (images, clips,
    files per kind, {file: reason} for the files a tokenizer refuses)."""
    images: list[ImageSample] = []
    clips: list[AudioSample] = []
    counts: Counter[str] = Counter()
    rejected: dict[str, str] = {}
    for path in sorted(p for p in media_dir.rglob("*") if p.is_file()):
        kind = media_type_of(extension_of(path.name))
        if kind is None:
            continue
        try:
            if kind == "image":
                images.append(ImageSample(image.preprocess(path.read_bytes())))
            elif kind == "video":
                frames = read_frames(path.read_bytes(), video.frames)
                images += [ImageSample(f) for f in video.frames_to_pixels(frames)]
            else:
                clips.append(AudioSample(audio.preprocess(*decode_audio(path.read_bytes()))))
            counts[kind] += 1
        except (TokenizerInputError, RuntimeError, soundfile.LibsndfileError) as error:
            rejected[str(path.relative_to(media_dir))] = str(error)
    return images, clips, counts, rejected


def palette_baseline(
    train: WarmupData,
    images: list[ImageSample],
    clips: list[AudioSample],
    image: ImageTokenizer,
    audio: AudioTokenizer,
) -> dict[str, float]:
    """The palette codecs (:mod:`tokenization.baselines`) with the tokenizers' budgets,
    fitted on ``train``'s training media and scored on ``images`` and ``clips``."""
    train_pixels = distinct([s.pixels for s in train.train_images])
    return palette_quality(
        torch.stack(train_pixels) if train_pixels else torch.empty(0),
        distinct([s.mel for s in train.train_audio]),
        torch.stack([s.pixels for s in images]) if images else None,
        [s.mel for s in clips],
        block=image.config.downsample,
        colours=image.config.quantizer.codebook_size,
        span=audio.config.span,
        entries=audio.config.quantizer.codebook_size,
    )


def evaluate_media(config: PipelineConfig, media_dir: Path) -> dict[str, Any]:
    """Reconstruction quality of the saved tokenizers on every medium under ``media_dir``,
    and under ``palette`` the same measures of the trivial palette codecs with the same
    budgets, fitted on the warm-up's training media (the workspace's shards)."""
    if not media_dir.is_dir():
        raise FileNotFoundError(f"--media: no such folder: {media_dir}")
    tokenizers = load_tokenizers(config)
    image, audio, video = tokenizers.image, tokenizers.audio, tokenizers.video
    images, clips, counts, rejected = read_media(media_dir, image, audio, video)
    result: dict[str, Any] = {"items": dict(counts), "rejected": rejected}
    result.update(evaluate_images(image, images))
    result.update(evaluate_audio(audio, clips))
    if counts["video"]:
        result["video_tokens_per_item"] = float(video.tokens_per_video)
    storage = Storage(config.storage)
    documents = _documents(storage, join(absolute(config.workspace), "shards"))
    train, _ = collect(documents, image, audio, video, config.tokenizers.warmup.eval_fraction)
    result["palette"] = palette_baseline(train, images, clips, image, audio)
    return result
