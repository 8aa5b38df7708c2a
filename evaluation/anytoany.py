"""Any-to-any generation from a checkpoint: one function for ``omni generate`` and the tasks.

Inputs become instructions exactly as pre-tokenisation builds them (``<BOS>`` then the
text, or the wrapped medium ``<BOI> ids <EOI>`` / ``<BOA> .. <EOA>`` / ``<BOV> .. <EOV>``),
so the model sees at inference what it saw in training. :func:`generate_batch` runs the
run's own decoder: DFM (the DGS sampler for text, a fixed media canvas for images and
audio, the cache and decoding order of the sampler config) or, for the AR baseline, greedy KV-cached
decoding on the same head groups. Responses come back as *local* ids of the target's
tokenizer, ready for its ``decode``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from evaluation.checkpoint import EvalInputError, LoadedCheckpoint
from evaluation.media_io import mel_to_waveform, png_bytes, wav_bytes
from tokenization.audio import decode_audio
from tokenization.bundle import Tokenizers
from tokenization.errors import TokenizerInputError
from tokenization.sequences import MEDIA_MARKERS
from tokenization.vocab import VocabLayout
from training.autoregressive import ar_generate
from training.generation import choose_lengths, generate
from training.model_predictor import ModelPredictor
from training.sampling import SamplerConfig, Vocabulary

TARGETS = ("text", "image", "audio")
SUFFIXES = {
    "image": {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"},
    "audio": {".wav", ".flac", ".mp3", ".ogg"},
    "video": {".mp4", ".webm", ".mov", ".avi", ".mkv"},
    "text": {".txt", ".md"},
}
# What the model was trained to produce from what (the buckets of pre-tokenisation).
TASKS = {
    ("image", "text"),
    ("video", "text"),
    ("audio", "text"),
    ("text", "text"),
    ("text", "image"),
    ("text", "audio"),
}
BLOCK = {"image": "image", "video": "image", "audio": "audio"}  # vocabulary block per medium


def without_dgs(sampler: SamplerConfig) -> SamplerConfig:
    """The same sampler with one text canvas of ``max_length``: DGS probes one length only."""
    return sampler.model_copy(update={"block_size": sampler.max_length})


def instruction(layout: VocabLayout, kind: str, local: Tensor) -> Tensor:
    """Long[P] unified ids: ``<BOS>`` then text ids, or the wrapped medium of ``kind``."""
    bos = torch.tensor([layout.special_id("<BOS>")])
    if kind == "text":
        return torch.cat([bos, local.long()])
    begin, end = (torch.tensor([layout.special_id(m)]) for m in MEDIA_MARKERS[kind])
    ids = layout.to_unified(BLOCK[kind], local.long().cpu())
    return torch.cat([bos, begin, ids, end])


def pad_rows(rows: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor | None]:
    """Right-pad Long[P_i] rows -> (Long[B, P], Bool[B, P] real-token mask or None)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return ids, None if bool(mask.all()) else mask


@dataclass
class Generated:
    """One batch's responses (local ids of the target) and, for DFM text, DGS's lengths."""

    responses: list[Tensor]
    canvas_lengths: Tensor | None = None  # Long[B]: DGS's chosen text canvas (DFM only)


def generate_batch(
    loaded: LoadedCheckpoint,
    instructions: list[Tensor],
    target: str,
    sampler: SamplerConfig,
    media_tokens: int | None = None,
    seed: int = 0,
) -> Generated:
    """One ``target`` response per instruction (Long[P_i] unified ids).

    DFM: :func:`training.generation.generate` along the run's path; for text, DGS's
    canvas lengths are probed first with an identically seeded generator, so they are the
    lengths the generation itself picks. AR: greedy decoding restricted to the target's
    head (text up to ``<EOS>`` or ``max_length``; media ``media_tokens`` ids after the
    opening marker).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    model, layout, device = loaded.model, loaded.model.layout, loaded.device
    pad_id, text_size = layout.special_id("<PAD>"), layout.text_size
    if loaded.path is None:
        return Generated(_ar_generate(loaded, instructions, target, sampler, media_tokens))
    ids, mask = pad_rows(instructions, pad_id)
    ids, mask = ids.to(device), None if mask is None else mask.to(device)
    lengths = None
    if target == "text":
        probe = ModelPredictor(model, ids, mask, sampler.cache)
        vocab = Vocabulary(layout, model.groups)
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.inference_mode():
            lengths = choose_lengths(
                probe, loaded.path, len(instructions), vocab, sampler, device, generator
            ).cpu()
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = generate(model, ids, target, loaded.path, sampler, mask, media_tokens, generator)
    if target == "text":
        return Generated([r[r < text_size].cpu() for r in rows], lengths)
    start = model.groups.start[target]
    out = []
    for row in rows:
        media = row[1 : 1 + media_tokens].cpu()  # <BO*> ids <EO*>
        out.append(media - start)
    return Generated(out)


def _ar_generate(
    loaded: LoadedCheckpoint,
    instructions: list[Tensor],
    target: str,
    sampler: SamplerConfig,
    media_tokens: int | None,
) -> list[Tensor]:
    model, layout, device = loaded.model, loaded.model.layout, loaded.device
    eos_id = layout.special_id("<EOS>")
    if target == "text":
        ids, mask = pad_rows(instructions, layout.special_id("<PAD>"))
        mask = None if mask is None else mask.to(device)
        new = ar_generate(model, ids.to(device), sampler.max_length, "text", eos_id, mask)
        out = []
        for row in new.cpu():
            ends = (row == eos_id).nonzero()
            row = row[: int(ends[0])] if len(ends) else row
            out.append(row[row < layout.text_size])
        return out
    begin = torch.tensor([layout.special_id(MEDIA_MARKERS[target][0])])
    rows = [torch.cat([r, begin]) for r in instructions]
    ids, mask = pad_rows(rows, layout.special_id("<PAD>"))
    mask = None if mask is None else mask.to(device)
    new = ar_generate(model, ids.to(device), media_tokens, target, None, mask)
    return list(new.cpu() - model.groups.start[target])


# ---------------------------------------------------------------------------- raw inputs


def input_kind(value: str) -> str:
    """``text`` for a string that is not a file, else the kind its suffix names."""
    path = Path(value)
    suffix = path.suffix.lower()
    known = {s for group in SUFFIXES.values() for s in group}
    if not path.is_file():
        if suffix in known and len(value) < 4096 and "\n" not in value:
            raise EvalInputError(f"--input {value}: no such file")
        return "text"
    for kind, suffixes in SUFFIXES.items():
        if suffix in suffixes:
            return kind
    raise EvalInputError(
        f"--input {value}: cannot tell its kind from the suffix {suffix or '(none)'}; "
        f"use one of {sorted(known)} or pass the text itself"
    )


def encode_input(tokenizers: Tokenizers, value: str) -> tuple[str, Tensor]:
    """A string or file -> (kind, Long[n] local ids of that kind's tokenizer)."""
    kind = input_kind(value)
    if kind == "text":
        text = Path(value).read_text(encoding="utf-8") if Path(value).is_file() else value
        if not text.strip():
            raise EvalInputError("--input: the text is empty")
        return "text", torch.tensor(tokenizers.text.encode([text])[0], dtype=torch.long)
    data = Path(value).read_bytes()
    try:
        if kind == "image":
            pixels = tokenizers.image.preprocess(data)[None]
            return kind, tokenizers.image.encode(pixels)[0].cpu()
        if kind == "audio":
            return kind, tokenizers.audio.encode([_read_audio(data)])[0]
        return kind, tokenizers.video.encode([data])[0].cpu()
    except TokenizerInputError as error:
        raise EvalInputError(f"--input {value}: not a readable {kind}: {error}") from None


def _read_audio(data: bytes) -> tuple[np.ndarray, int]:
    try:
        return decode_audio(data)
    except Exception as error:  # soundfile raises its own LibsndfileError
        raise TokenizerInputError(f"{type(error).__name__}: {error}") from None


def check_task(kind: str, target: str) -> None:
    """EvalInputError unless ``kind -> target`` is a task the model was trained for."""
    if (kind, target) not in TASKS:
        trained = ", ".join(f"{a}->{b}" for a, b in sorted(TASKS))
        raise EvalInputError(f"cannot generate {target} from {kind}; trained tasks: {trained}")


def decoded_file(tokenizers: Tokenizers, target: str, local: Tensor) -> bytes:
    """A response's local ids -> the bytes of a file: UTF-8 text, a PNG, or a WAV."""
    if target == "text":
        return (tokenizers.text.decode(local.tolist()) + "\n").encode()
    if target == "image":
        return png_bytes(tokenizers.image.decode(local[None].cpu())[0])
    mel = tokenizers.audio.decode(local.cpu())
    return wav_bytes(mel_to_waveform(mel, tokenizers.audio.feature_extractor.mel_filters))


def media_tokens_for(tokenizers: Tokenizers, target: str, seconds: float) -> int | None:
    """Positions of a generated medium: an image's grid, a clip of ``seconds``."""
    if target == "image":
        return tokenizers.image.tokens_per_image
    if target == "audio":
        return tokenizers.audio.tokens_for_seconds(seconds)
    return None
