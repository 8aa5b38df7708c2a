"""Video tokenizer: a clip becomes ``frames`` sampled frames, each tokenized as an image.

NExT-OMNI treats a video as "8 frames as multiple images": there is no temporal codebook,
so a clip's ids are the image tokenizer's ids of its frames, frame after frame
(``(frames * tokens_per_image,)`` per clip), and decoding gives the frames back.

Frames are read with decord; a file decord cannot open or decode is read again with PyAV
(both wrap FFmpeg and give identical RGB frames on the sample corpus). Only when both fail
is the clip rejected, with a :class:`~tokenization.errors.TokenizerInputError` naming both
reasons, so the pretokenize stage can quarantine it.
"""

from __future__ import annotations

import io
import re
from typing import Protocol

import av
import decord
import numpy as np
import torch
from PIL import Image

from tokenization.config import VideoConfig
from tokenization.errors import TokenizerInputError

# decord prefixes its messages with "[hh:mm:ss] /path/to/file.cc:NN: ".
_DECORD_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
_REASON_CHARS = 200


class FrameTokenizer(Protocol):
    """The part of :class:`tokenization.image.ImageTokenizer` a video tokenizer uses."""

    @property
    def tokens_per_image(self) -> int: ...

    def preprocess(self, image: Image.Image | bytes, side: int | None = None) -> torch.Tensor: ...

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode(self, ids: torch.Tensor) -> torch.Tensor: ...


def sample_indices(total: int, frames: int) -> np.ndarray:
    """``frames`` frame indices spread uniformly over a clip of ``total`` frames: (frames,).

    ``round(linspace(0, total - 1, frames))``: the first and the last frame are always kept
    and the gaps differ by at most one frame (e.g. 75 frames -> 0 11 21 32 42 53 63 74).
    A clip shorter than ``frames`` repeats frames (3 frames -> 0 0 1 1 1 1 2 2), so every
    clip yields the same number of tokens; a one-frame clip yields ``frames`` copies.
    """
    if total <= 0:
        raise TokenizerInputError("video has no frames")
    return np.rint(np.linspace(0, total - 1, frames)).astype(np.int64)


def read_frames(data: bytes, frames: int) -> np.ndarray:
    """Decode ``frames`` uniformly sampled RGB frames of an encoded clip: (frames, H, W, 3) uint8.

    decord first; PyAV if decord cannot open or decode the file. Raises
    :class:`TokenizerInputError` when neither can, or when the clip has no frame.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    try:
        return _read_with_decord(data, frames)
    except Exception as decord_error:
        try:
            return _read_with_av(data, frames)
        except Exception as av_error:
            raise TokenizerInputError(
                f"cannot decode video: decord: {_reason(decord_error)}; PyAV: {_reason(av_error)}"
            ) from av_error


def _read_with_decord(data: bytes, frames: int) -> np.ndarray:
    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    # Decode each wanted frame once, then repeat it where the indices repeat.
    wanted, positions = np.unique(sample_indices(len(reader), frames), return_inverse=True)
    return reader.get_batch(wanted.tolist()).asnumpy()[positions]


def _read_with_av(data: bytes, frames: int) -> np.ndarray:
    """The fallback: decode the whole clip (the header's frame count may be wrong), holding
    every decoded frame in memory until the sampled ones are converted to RGB."""
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise TokenizerInputError("no video stream")
        decoded = list(container.decode(container.streams.video[0]))
    indices = sample_indices(len(decoded), frames)
    return np.stack([decoded[i].to_ndarray(format="rgb24") for i in indices])


def _reason(error: Exception) -> str:
    """``Type: first line of the message``, without decord's prefix, cut to 200 characters."""
    lines = str(error).strip().splitlines()
    first = _DECORD_PREFIX.sub("", lines[0]) if lines else ""
    return f"{type(error).__name__}: {first}"[:_REASON_CHARS]


class VideoTokenizer:
    """Clips to ids and back through an image tokenizer, ``frames`` images per clip."""

    def __init__(self, image_tokenizer: FrameTokenizer, config: VideoConfig) -> None:
        self.image_tokenizer = image_tokenizer
        self.config = config

    @property
    def frames(self) -> int:
        return self.config.frames

    @property
    def tokens_per_video(self) -> int:
        """``frames * tokens_per_image`` ids per clip."""
        return self.frames * self.image_tokenizer.tokens_per_image

    def frames_to_pixels(self, frames: np.ndarray, side: int | None = None) -> torch.Tensor:
        """(F, H, W, 3) uint8 frames -> (F, 3, R, R) pixels, via the image preprocessing
        (``side`` overrides R as in :meth:`ImageTokenizer.preprocess`)."""
        return torch.stack(
            [self.image_tokenizer.preprocess(Image.fromarray(frame), side) for frame in frames]
        )

    def encode(self, videos: list[bytes]) -> torch.Tensor:
        """Encoded clips -> ids (B, frames * tokens_per_image), frames in time order.

        The frames of all clips go through the image tokenizer as one batch of
        ``B * frames`` images. A clip that cannot be decoded raises
        :class:`TokenizerInputError` naming its position in ``videos``.
        """
        if not videos:
            return torch.empty((0, self.tokens_per_video), dtype=torch.long)
        pixels = []
        for position, data in enumerate(videos):
            try:
                pixels.append(self.frames_to_pixels(read_frames(data, self.frames)))
            except TokenizerInputError as error:
                raise TokenizerInputError(f"video {position}: {error}") from error
        ids = self.image_tokenizer.encode(torch.cat(pixels))  # (B * frames, tokens_per_image)
        return ids.reshape(len(videos), self.tokens_per_video)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, frames * tokens_per_image) -> frames (B, frames, 3, R, R)."""
        if ids.dim() != 2 or ids.shape[1] != self.tokens_per_video:
            raise ValueError(
                f"expected ids of shape (B, {self.tokens_per_video}), got {tuple(ids.shape)}"
            )
        per_frame = ids.reshape(-1, self.image_tokenizer.tokens_per_image)
        pixels = self.image_tokenizer.decode(per_frame)  # (B * frames, 3, R, R)
        return pixels.reshape(ids.shape[0], self.frames, *pixels.shape[1:])
