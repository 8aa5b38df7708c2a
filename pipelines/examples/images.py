"""The UCI handwritten digits as scikit-learn ships them, drawn as ink on paper.

``load_digits()`` holds 1,797 images of 8x8 cells, each the count (0..16) of ink pixels of a
4x4 block of the original 32x32 scan. They are padded by one cell, upscaled with cubic
splines, smoothed and passed through a steep sigmoid, so a 64 px image shows a dark pen
stroke on a white page rather than blurred blocks.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EVAL_EVERY = 6  # every 6th image of each digit is held out: 1/6 = 16.7% of the images
CELLS = 8


@dataclass(frozen=True)
class DigitImages:
    """``cells``: (N, 8, 8) ink in [0, 1]; ``labels``: (N,) the digits; ``split``: (N,)
    ``"train"``/``"eval"``."""

    cells: np.ndarray
    labels: np.ndarray
    split: np.ndarray

    def indices(self, digit: int, split: str) -> np.ndarray:
        """Indices of the images of ``digit`` in ``split``, ascending."""
        return np.flatnonzero((self.labels == digit) & (self.split == split))


def load_digit_images() -> DigitImages:
    """The 1,797 digits and a deterministic held-out split, stratified by digit.

    The split does not depend on the builder's seed: the eval images stay the same while
    captions and the other random choices change with it.
    """
    cells, labels = _load_digits()
    split = np.full(labels.shape, "train", dtype=object)
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        split[members[EVAL_EVERY - 1 :: EVAL_EVERY]] = "eval"
    return DigitImages(cells / 16.0, labels, split.astype(str))


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits()``'s images (N, 8, 8) and targets (N,), as float64 and int64.

    Read from the CSV inside the scikit-learn package, which is what ``load_digits`` reads:
    importing ``sklearn`` itself pulls in scipy.stats and pandas (2 s of a build of a few
    seconds). ``load_digits`` stays the fallback should the file move.
    """
    spec = importlib.util.find_spec("sklearn")
    folders = spec.submodule_search_locations if spec else None
    path = Path(folders[0], "datasets", "data", "digits.csv.gz") if folders else None
    if path is not None and path.is_file():
        with gzip.open(path) as handle:
            table = np.loadtxt(handle, delimiter=",")
        return table[:, :-1].reshape(-1, CELLS, CELLS), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


@functools.cache
def _upscale_matrix(side: int) -> np.ndarray:
    """(side, 10): cubic-spline zoom of a padded 10-cell axis to ``side`` px, then a
    Gaussian blur of ``side / 64`` px. Both are linear and separable, so an image is
    ``M @ X @ M.T``: one matrix product for every digit instead of 1,797 ``zoom`` calls."""
    from scipy.ndimage import gaussian_filter1d, zoom

    padded = CELLS + 2
    columns = [
        gaussian_filter1d(
            zoom(unit, side / padded, order=3, mode="nearest", grid_mode=True), side / 64
        )
        for unit in np.eye(padded)
    ]
    return np.stack(columns, axis=1)


def ink(cells: np.ndarray, side: int) -> np.ndarray:
    """Digits' ink (..., 8, 8) in [0, 1] -> (..., side, side) uint8, dark strokes on white."""
    matrix = _upscale_matrix(side)
    padded = np.pad(cells, [(0, 0)] * (cells.ndim - 2) + [(1, 1), (1, 1)])
    smooth = matrix @ padded @ matrix.T
    strokes = _sigmoid((np.clip(smooth, 0, 1) - 0.45) * 10)
    low, high = _sigmoid(-4.5), _sigmoid(5.5)  # the curve's ends at ink 0 and 1
    strokes = (strokes - low) / (high - low)
    return np.rint(255 * (1 - np.clip(strokes, 0, 1))).astype(np.uint8)


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def png_bytes(pixels: np.ndarray) -> bytes:
    """A grayscale (H, W) uint8 array as PNG: the same bytes for the same pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
