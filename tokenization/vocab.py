"""The unified vocabulary: every modality's ids in one integer space.

Layout, in order: text BPE ids, the special tokens, the image codebook ids, the audio
codebook ids. Videos are frames of the image tokenizer, wrapped in ``<BOV>``/``<EOV>``.

    [0, T)                    text           (BPE)
    [T, T + S)                special        (<BOS> <EOS> <PAD> <MASK> ...)
    [T + S, T + S + I)        image          (K_img * image codebook size)
    [T + S + I, size)         audio          (K_aud * audio codebook size)

The layout is saved beside the tokenizers and carried by every token shard and checkpoint;
data made with another layout is refused (:class:`LayoutMismatchError`), because its ids
would silently mean other tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPECIAL_TOKENS: tuple[str, ...] = (
    "<BOS>", "<EOS>", "<PAD>", "<MASK>", "<SEP>",
    "<BOI>", "<EOI>", "<BOA>", "<EOA>", "<BOV>", "<EOV>",
)  # fmt: skip

# Modality codes stored per position in token samples (modality.npy, uint8).
MODALITY_CODES: dict[str, int] = {"text": 0, "special": 1, "image": 2, "audio": 3}
LAYOUT_FILE = "vocab_layout.json"


class LayoutMismatchError(ValueError):
    """Data or weights were made with a different vocabulary layout."""


@dataclass(frozen=True)
class VocabLayout:
    """Sizes of each block of the unified vocabulary; offsets follow from them."""

    text_size: int
    image_size: int
    audio_size: int
    specials: tuple[str, ...] = SPECIAL_TOKENS

    def __post_init__(self) -> None:
        for name in ("text_size", "image_size", "audio_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if len(set(self.specials)) != len(self.specials):
            raise ValueError("special tokens must be unique")

    @property
    def offsets(self) -> dict[str, int]:
        special = self.text_size
        image = special + len(self.specials)
        audio = image + self.image_size
        return {"text": 0, "special": special, "image": image, "audio": audio}

    @property
    def sizes(self) -> dict[str, int]:
        return {"text": self.text_size, "special": len(self.specials),
                "image": self.image_size, "audio": self.audio_size}  # fmt: skip

    @property
    def size(self) -> int:
        return self.offsets["audio"] + self.audio_size

    def special_id(self, token: str) -> int:
        """Unified id of a special token such as ``<EOS>``."""
        try:
            return self.offsets["special"] + self.specials.index(token)
        except ValueError:
            raise KeyError(f"unknown special token {token!r}") from None

    def to_unified(self, modality: str, local: Any) -> Any:
        """Local ids of one modality (int, numpy or torch) -> unified ids, range-checked."""
        if modality not in self.offsets:
            raise KeyError(f"unknown modality {modality!r}")
        values = np.asarray(local.cpu() if hasattr(local, "cpu") else local)
        if values.size and (values.min() < 0 or values.max() >= self.sizes[modality]):
            raise ValueError(f"{modality} ids must lie in [0, {self.sizes[modality]})")
        return local + self.offsets[modality]

    def modality_of(self, ids: np.ndarray) -> np.ndarray:
        """Modality code (uint8, see MODALITY_CODES) of every unified id."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"unified ids must lie in [0, {self.size})")
        bounds = [self.offsets["special"], self.offsets["image"], self.offsets["audio"]]
        return np.searchsorted(bounds, ids, side="right").astype(np.uint8)

    def to_local(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unified ids -> (modality codes, local ids within each modality)."""
        codes = self.modality_of(ids)
        starts = np.array([self.offsets[m] for m in MODALITY_CODES], dtype=np.int64)
        return codes, np.asarray(ids, dtype=np.int64) - starts[codes]

    def fingerprint(self) -> str:
        """Short hash of the layout, stored in shards and checkpoints."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def check_same(self, other: VocabLayout, what: str) -> None:
        """Refuse ``what`` (a shard, a checkpoint) made with a different layout."""
        if self != other:
            mine, theirs = asdict(self), asdict(other)
            diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
            raise LayoutMismatchError(
                f"{what} was made with vocabulary layout {other.fingerprint()}, the tokenizers "
                f"have {self.fingerprint()}; differences (theirs, ours): {diff}"
            )

    def save(self, directory: str | Path) -> None:
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        payload = {**asdict(self), "fingerprint": self.fingerprint()}
        (folder / LAYOUT_FILE).write_text(json.dumps(payload, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> VocabLayout:
        path = Path(directory) / LAYOUT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: tokenizers saved without a layout")
        data = json.loads(path.read_text())
        stored = data.pop("fingerprint", None)
        layout = cls(**{**data, "specials": tuple(data["specials"])})
        if stored is not None and stored != layout.fingerprint():
            raise LayoutMismatchError(f"{path} is corrupt: fingerprint does not match content")
        return layout
