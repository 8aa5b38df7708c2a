"""What one pretokenize actor does with one shard: documents in, token tars per bucket out.

Media are decoded one document at a time (a medium a tokenizer refuses quarantines its
document, never the shard), then encoded in batches per modality: all texts in one BPE
call, images and video frames in image batches, audio clips in audio batches. Each
document then yields its sequences per bucket (``tokenization.sequences``), staged as
one WebDataset tar per bucket ``tokens/_staged/<bucket>/<shard>.tar`` and, last, a marker
listing them; ``pipelines.pretokenize.packing`` then packs the staged samples of all
shards into tars of ``samples_per_tar``.

A medium that crashes its decoder outright (a native segfault or abort, not a Python
exception) kills the process instead; the driver then finds the document on its own
(``pipelines.pretokenize.stage``) and the shard is processed again with it passed in
``crashed``, so it is quarantined unread and the rest of the shard goes through.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from infra.storage import join
from pipelines.pretokenize.settings import WorkerSettings
from pipelines.shard.documents import corpus_metadata
from pipelines.stage_state import read_parquet
from tokenization.audio import decode_audio
from tokenization.bundle import Tokenizers
from tokenization.errors import TokenizerInputError
from tokenization.sequences import TokenizedSegment, build_sequences
from tokenization.token_samples import declared_split, encode_sample, sample_key, write_tar
from tokenization.video import read_frames

STAGE = "pretokenize"
STAGED = "_staged"
LENGTH_BINS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # sequence-length histogram edges


def length_bin(length: int) -> str:
    """Histogram bin of a sequence length: ``<=32`` ... ``<=4096``, ``>4096``."""
    for edge in LENGTH_BINS:
        if length <= edge:
            return f"<={edge}"
    return f">{LENGTH_BINS[-1]}"


def marker_uri(tokens_dir: str, part: str) -> str:
    return join(tokens_dir, "_done", part.replace(".parquet", ".json"))


def staged_path(bucket: str, part: str) -> str:
    """Where input shard ``part`` stages its samples of ``bucket`` (under ``tokens/``)."""
    number = int(part.removeprefix("part-").removesuffix(".parquet"))
    return f"{STAGED}/{bucket}/{number:06d}.tar"


class _Pending:
    """Media of a batch of documents waiting to be encoded, and where their ids go."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.pixels: list[torch.Tensor] = []
        self.mels: list[torch.Tensor] = []

    def add(self, kind: str, items: list[Any]) -> tuple[str, int, int]:
        store = {"text": self.texts, "image": self.pixels, "video": self.pixels, "audio": self.mels}
        start = len(store[kind])
        store[kind].extend(items)
        return kind, start, len(items)


def _prepare(document: dict[str, Any], tokenizers: Tokenizers) -> list[tuple[str, list]]:
    """Decode a document's media: ``[(kind, items), ...]`` per segment, in order.

    Raises TokenizerInputError naming the modality of the first medium that fails, so
    nothing of a rejected document reaches the encode batches.
    """
    decoded = []
    for segment in document["segments"]:
        kind, data = segment["type"], segment["bytes"]
        try:
            if kind == "text":
                decoded.append((kind, [segment["text"]]))
            elif kind == "image":
                decoded.append((kind, [tokenizers.image.preprocess(data)]))
            elif kind == "video":
                frames = read_frames(data, tokenizers.video.frames)
                decoded.append((kind, list(tokenizers.video.frames_to_pixels(frames))))
            elif kind == "audio":
                decoded.append((kind, [tokenizers.audio.preprocess(*decode_audio(data))]))
        except TokenizerInputError as error:
            raise TokenizerInputError(f"{kind}: {error}") from error
        except Exception as error:  # a decoder's own exception: same treatment, named
            raise TokenizerInputError(f"{kind}: {type(error).__name__}: {error}") from error
    return decoded


def _encode(pending: _Pending, tokenizers: Tokenizers, settings: WorkerSettings) -> dict:
    """Unified ids for every pending item, encoded in batches per modality."""
    layout, image = tokenizers.layout, tokenizers.image
    ids: dict[str, list[np.ndarray]] = {"text": [], "image": [], "audio": []}
    ids["text"] = [np.asarray(t, dtype=np.int64) for t in tokenizers.text.encode(pending.texts)]
    for start in range(0, len(pending.pixels), settings.image_batch):
        batch = torch.stack(pending.pixels[start : start + settings.image_batch])
        device = next(image.parameters()).device
        ids["image"] += list(image.encode(batch.to(device)).cpu().numpy())
    for start in range(0, len(pending.mels), settings.audio_batch):
        encoded = tokenizers.audio.encode_mels(pending.mels[start : start + settings.audio_batch])
        ids["audio"] += [row.numpy() for row in encoded]
    offsets = layout.offsets
    return {
        "text": [i + offsets["text"] for i in ids["text"]],
        "image": [i.astype(np.int64) + offsets["image"] for i in ids["image"]],
        "audio": [i.astype(np.int64) + offsets["audio"] for i in ids["audio"]],
    }


def _quarantine(document: dict[str, Any], reason: str, detail: str) -> dict[str, str]:
    return {
        "id": document["id"],
        "native_id": document["native_id"],
        "source": document["origin"],
        "stage": STAGE,
        "reason": reason,
        "detail": detail[:500],
    }


def tokenize_documents(
    documents: list[dict[str, Any]], tokenizers: Tokenizers, settings: WorkerSettings
) -> tuple[dict[str, list[dict[str, bytes]]], list[dict[str, str]]]:
    """Shard rows -> (encoded WebDataset samples per bucket, quarantine rows)."""
    pending, accepted, quarantine = _Pending(), [], []
    for document in documents:
        try:
            decoded = _prepare(document, tokenizers)
        except TokenizerInputError as error:
            kind = str(error).split(":", 1)[0]
            quarantine.append(_quarantine(document, f"{kind}_rejected", str(error)))
            continue
        accepted.append((document, [pending.add(kind, items) for kind, items in decoded]))
    ids = _encode(pending, tokenizers, settings)
    layout_fingerprint = tokenizers.layout.fingerprint()
    samples: dict[str, list[dict[str, bytes]]] = defaultdict(list)
    for document, slots in accepted:
        segments = []
        for kind, start, count in slots:
            source = "image" if kind == "video" else kind
            parts = ids[source][start : start + count]
            segments.append(TokenizedSegment(kind, np.concatenate(parts)))
        sequences, skipped = build_sequences(segments, tokenizers.layout, settings.sequences)
        for reason in skipped:
            quarantine.append(_quarantine(document, reason.split(":")[0], reason))
        meta = sample_meta(document, layout_fingerprint, settings.eval_fraction)
        for sequence in sequences:
            key = sample_key(document["id"], sequence.bucket)
            samples[sequence.bucket].append(encode_sample(key, sequence, meta))
    return samples, quarantine


def sample_meta(
    document: dict[str, Any], layout_fingerprint: str, eval_fraction: float
) -> dict[str, Any]:
    """The caller's part of a token sample's ``meta.json``: ids, source, split, layout, and
    the document's ``label`` when its metadata has one (evaluation scores against it).

    The split is the one the document declares in its metadata (``split``: train/eval),
    else the hash of its id (:func:`~tokenization.token_samples.declared_split`).
    """
    metadata = corpus_metadata(document)
    meta = {
        "document_id": document["id"],
        "native_id": document["native_id"],
        "source": document["origin"],
        "split": declared_split(document["id"], metadata, eval_fraction),
        "layout": layout_fingerprint,
    }
    if "label" in metadata:
        meta["label"] = metadata["label"]
    return meta


def read_documents(part: str, settings: WorkerSettings) -> list[dict[str, Any]]:
    """The rows (documents, media bytes embedded) of input shard ``part``."""
    return read_parquet(settings.storage, join(settings.shards_dir, part)).to_pylist()


def process_shard(
    part: str,
    tokenizers: Tokenizers,
    settings: WorkerSettings,
    crashed: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Tokenize one input shard and stage its samples; idempotent through its marker.

    Staged tars are written atomically under deterministic names, the marker last: a
    worker killed half-way leaves no marker, and the retry rewrites the same tars with the
    same content, so no sample is lost or duplicated. ``crashed``: document id -> why;
    those documents crashed a worker and are quarantined without being decoded again.
    """
    storage = settings.storage
    marker = marker_uri(settings.tokens_dir, part)
    if storage.exists(marker):
        return {**json.loads(storage.read_bytes(marker)), "resumed": True}
    documents = read_documents(part, settings)
    crashed = crashed or {}
    samples, quarantine = tokenize_documents(
        [d for d in documents if d["id"] not in crashed], tokenizers, settings
    )
    quarantine += [
        _quarantine(d, "decoder_crashed", crashed[d["id"]]) for d in documents if d["id"] in crashed
    ]
    staged, stats = [], {}
    for bucket in sorted(samples):
        metas = {s["__key__"]: json.loads(s["meta.json"]) for s in samples[bucket]}
        # Split, then key: each split is one contiguous run, which packing cuts into tars
        # of a single split (so every rank gets its share of each split). The tar keeps
        # this order (sort=False): sorted by key, the runs would interleave.
        ordered = sorted(
            samples[bucket], key=lambda s: (metas[s["__key__"]]["split"], s["__key__"])
        )
        lengths = [metas[s["__key__"]]["length"] for s in ordered]
        stats[bucket] = {
            "samples": len(ordered),
            "tokens": int(sum(lengths)),
            "histogram": dict(Counter(length_bin(n) for n in lengths)),
        }
        path = staged_path(bucket, part)
        storage.write_bytes(join(settings.tokens_dir, path), write_tar(ordered, sort=False))
        splits = Counter(metas[s["__key__"]]["split"] for s in ordered)
        staged.append(
            {"bucket": bucket, "path": path, "samples": len(ordered), "splits": dict(splits)}
        )
    result = {
        "part": part,
        "staged": staged,
        "stats": stats,
        "quarantine": quarantine,
        "documents": len(documents),
    }
    storage.write_bytes(marker, json.dumps(result).encode())
    return {**result, "resumed": False}
