"""The unified vocabulary is a bijection and refuses a mismatched layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tokenization.vocab import (
    MODALITY_CODES,
    SPECIAL_TOKENS,
    LayoutMismatchError,
    VocabLayout,
)

LAYOUT = VocabLayout(text_size=100, image_size=64, audio_size=32)


def test_blocks_are_in_the_documented_order() -> None:
    assert LAYOUT.offsets == {"text": 0, "special": 100, "image": 111, "audio": 175}
    assert LAYOUT.size == 100 + len(SPECIAL_TOKENS) + 64 + 32
    assert LAYOUT.special_id("<BOS>") == 100 and LAYOUT.special_id("<EOV>") == 110
    with pytest.raises(KeyError):
        LAYOUT.special_id("<NOPE>")


def test_unified_and_local_ids_are_a_bijection() -> None:
    every_id = np.arange(LAYOUT.size)
    codes, local = LAYOUT.to_local(every_id)
    rebuilt = [
        LAYOUT.to_unified(name, int(lid))
        for name, lid in zip((list(MODALITY_CODES)[c] for c in codes), local, strict=True)
    ]
    assert rebuilt == every_id.tolist()
    assert np.bincount(codes).tolist() == [100, len(SPECIAL_TOKENS), 64, 32]
    assert codes.dtype == np.uint8


def test_out_of_range_ids_are_refused() -> None:
    with pytest.raises(ValueError, match=r"image ids must lie in \[0, 64\)"):
        LAYOUT.to_unified("image", np.array([3, 64]))
    with pytest.raises(ValueError):
        LAYOUT.modality_of(np.array([LAYOUT.size]))
    with pytest.raises(ValueError):
        VocabLayout(text_size=0, image_size=1, audio_size=1)


def test_torch_ids_keep_their_type() -> None:
    import torch

    unified = LAYOUT.to_unified("audio", torch.tensor([0, 31]))
    assert isinstance(unified, torch.Tensor) and unified.tolist() == [175, 206]


def test_save_load_round_trip_and_mismatch(tmp_path: Path) -> None:
    LAYOUT.save(tmp_path)
    assert VocabLayout.load(tmp_path) == LAYOUT
    other = VocabLayout(text_size=100, image_size=128, audio_size=32)
    LAYOUT.check_same(VocabLayout.load(tmp_path), "shard")
    with pytest.raises(LayoutMismatchError, match=r"image_size.*\(128, 64\)"):
        LAYOUT.check_same(other, "shard tokens/image2text/000000.tar")


def test_a_tampered_layout_file_is_refused(tmp_path: Path) -> None:
    LAYOUT.save(tmp_path)
    path = tmp_path / "vocab_layout.json"
    path.write_text(path.read_text().replace('"audio_size": 32', '"audio_size": 33'))
    with pytest.raises(LayoutMismatchError, match="corrupt"):
        VocabLayout.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="vocab_layout.json"):
        VocabLayout.load(tmp_path / "missing")
