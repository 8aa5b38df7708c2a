"""Validation of one segment's content: does it decode, and is it safe to decode?

Pure functions over bytes; each returns what later stages want to know without decoding
again (size, duration) or raises :class:`Rejected` with a stable reason code.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import av
import decord
import numpy as np
import soundfile
from PIL import Image

from pipelines.shard.documents import Rejected

# The pixel limit is enforced by check_image from the header, before decoding; Pillow's own
# bomb check would warn (or raise) with a less specific message, so it is switched off.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class MediaLimits:
    """Bounds that keep one hostile or broken file from taking a worker down."""

    max_image_pixels: int
    max_media_bytes: int
    video_probe_frames: int


@dataclass(frozen=True)
class MediaInfo:
    """What validation learned: pixel size for images, seconds for audio and video."""

    width: int = 0
    height: int = 0
    seconds: float = 0.0
    frames: int = 0


def check_text(text: object) -> str:
    """Text must be a string that encodes as UTF-8 (no lone surrogates).

    An empty or whitespace-only text passes: the document keeps its other segments
    (an image whose caption is empty is an image-only document), see ``accept``.
    """
    if not isinstance(text, str):
        raise Rejected("bad_segment", f"text segment holds {type(text).__name__}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Rejected("invalid_utf8", str(exc)) from None
    return text


def decode_utf8(data: bytes) -> str:
    """Strict UTF-8 decoding with a quarantine reason instead of an exception."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_utf8", str(exc)) from None


def _check_size(data: bytes, limits: MediaLimits) -> None:
    if not data:
        raise Rejected("empty_media", "media file is empty")
    if len(data) > limits.max_media_bytes:
        raise Rejected(
            "media_too_large", f"{len(data)} bytes > shard.max_media_bytes={limits.max_media_bytes}"
        )


def check_image(data: bytes, limits: MediaLimits) -> MediaInfo:
    """Reject decompression bombs from the header, then decode every pixel."""
    _check_size(data, limits)
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise Rejected("image_decode_error", f"{type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise Rejected(
            "image_too_large",
            f"{width}x{height} = {width * height} px > shard.max_image_pixels="
            f"{limits.max_image_pixels} (checked from the header, not decoded)",
        )
    if width == 0 or height == 0:
        raise Rejected("image_decode_error", f"zero-sized image {width}x{height}")
    try:
        image.load()
    except Exception as exc:
        raise Rejected("image_decode_error", f"{type(exc).__name__}: {exc}") from None
    return MediaInfo(width=width, height=height)


def check_audio(data: bytes, limits: MediaLimits) -> MediaInfo:
    """Decode the whole clip (libsndfile, else PyAV for AAC/M4A/Opus); empty is rejected.

    A clip shorter than its header declares is rejected as ``audio_truncated``: decoders
    return the frames that are there without complaint, so a cut download would pass.
    WAV is judged from its header alone, FLAC by the frames that decode against the
    total in its STREAMINFO block.
    """
    _check_size(data, limits)
    wav = _wav_frames(data)
    if wav is not None and wav.present < wav.declared:
        raise _truncated(wav)
    try:
        frames, rate = _decode_audio_with_sndfile(data)
    except Rejected:
        raise
    except Exception as sndfile_error:
        try:
            frames, rate = _decode_audio_with_av(data)
        except Exception as av_error:
            raise Rejected(
                "audio_decode_error",
                f"soundfile: {sndfile_error}; PyAV: {type(av_error).__name__}: {av_error}",
            ) from None
    if frames == 0:
        raise Rejected("empty_media", "audio has no samples")
    return MediaInfo(seconds=frames / float(rate), frames=frames)


@dataclass(frozen=True)
class _AudioLength:
    """Frames a header declares and frames the file holds, at ``rate`` frames per second."""

    declared: int
    present: int
    rate: int


def _truncated(length: _AudioLength) -> Rejected:
    return Rejected(
        "audio_truncated",
        f"the header declares {length.declared / length.rate:.3f} s ({length.declared} frames),"
        f" only {length.present / length.rate:.3f} s ({length.present} frames) are there",
    )


def _wav_frames(data: bytes) -> _AudioLength | None:
    """Declared and present frames of a RIFF/WAVE file, from its chunk headers alone.

    None when ``data`` is not a WAV or its length is unknown to the header (a streamed
    WAV writes 0 or 0xFFFFFFFF as the data size).
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset, block_align, rate = 12, 0, 0
    while offset + 8 <= len(data):
        tag = data[offset : offset + 4]
        (size,) = struct.unpack_from("<I", data, offset + 4)
        body = offset + 8
        if tag == b"fmt " and size >= 16 and body + 16 <= len(data):
            _, _, rate, _, block_align = struct.unpack_from("<HHIIH", data, body)
        elif tag == b"data":
            if not block_align or not rate or size in (0, 0xFFFFFFFF):
                return None
            held = min(size, len(data) - body)
            return _AudioLength(size // block_align, held // block_align, rate)
        offset = body + size + (size & 1)
    return None


def _decode_audio_with_sndfile(data: bytes) -> tuple[int, int]:
    """Frames and rate of the whole clip, decoded block by block with libsndfile.

    For FLAC, whose STREAMINFO holds the exact total, fewer frames than declared (a
    clean cut, or a cut mid-frame that makes the decoder lose sync) is ``audio_truncated``.
    """
    with soundfile.SoundFile(io.BytesIO(data)) as clip:
        declared = clip.frames if clip.format == "FLAC" else 0
        frames = 0
        try:
            for block in clip.blocks(blocksize=4096, dtype="float32", always_2d=True):
                frames += block.shape[0]
        except soundfile.LibsndfileError:
            if frames >= declared:
                raise
        if frames < declared:
            raise _truncated(_AudioLength(declared, frames, clip.samplerate))
        return frames, clip.samplerate


def _decode_audio_with_av(data: bytes) -> tuple[int, int]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = sum(frame.samples for frame in container.decode(stream))
        return frames, stream.rate or 1


def check_video(data: bytes, limits: MediaLimits) -> MediaInfo:
    """Open the container with decord and decode its first frames (PyAV if decord fails)."""
    _check_size(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        total = len(reader)
        if total == 0:
            raise Rejected("video_decode_error", "video has no frames")
        probe = min(total, limits.video_probe_frames)
        frames = reader.get_batch(list(range(probe))).asnumpy()
        _require_pixels(frames)
        fps = float(reader.get_avg_fps()) or 1.0
        return MediaInfo(
            width=frames.shape[2], height=frames.shape[1], seconds=total / fps, frames=total
        )
    except Rejected:
        raise
    except Exception as decord_error:
        try:
            return _probe_video_with_av(data, limits)
        except Exception as av_error:
            raise Rejected(
                "video_decode_error",
                f"decord: {str(decord_error).splitlines()[0][:200]}; "
                f"PyAV: {type(av_error).__name__}: {av_error}",
            ) from None


def _require_pixels(frames: np.ndarray) -> None:
    if frames.size == 0:
        raise Rejected("video_decode_error", "decoded frames are empty")


def _probe_video_with_av(data: bytes, limits: MediaLimits) -> MediaInfo:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        decoded = []
        for frame in container.decode(stream):
            decoded.append(frame)
            if len(decoded) >= limits.video_probe_frames:
                break
        if not decoded:
            raise ValueError("no frame decodes")
        rate = float(stream.average_rate or 1)
        total = stream.frames or len(decoded)
        return MediaInfo(
            width=decoded[0].width, height=decoded[0].height, seconds=total / rate, frames=total
        )


CHECKS = {"image": check_image, "audio": check_audio, "video": check_video}
