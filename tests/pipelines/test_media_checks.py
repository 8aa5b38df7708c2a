"""Media validation on real sample media and on deliberately broken files."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
import soundfile

from pipelines.shard.documents import Rejected
from pipelines.shard.media_checks import (
    MediaLimits,
    check_audio,
    check_image,
    check_text,
    check_video,
)
from tests import builders

LIMITS = MediaLimits(max_image_pixels=50_000_000, max_media_bytes=64 * 2**20, video_probe_frames=2)
MEDIA = Path(__file__).resolve().parents[2] / "examples" / "corpus" / "media"


def media(name: str) -> bytes:
    return (MEDIA / name).read_bytes()


def reason(check, data: bytes, limits: MediaLimits = LIMITS) -> str:
    with pytest.raises(Rejected) as rejected:
        check(data, limits)
    return rejected.value.reason


def test_real_media_pass_with_their_sizes() -> None:
    image = check_image(media("images/astronaut.jpg"), LIMITS)
    assert (image.width, image.height) == (384, 384)
    audio = check_audio(media("audio/goforward.wav"), LIMITS)
    assert audio.seconds == pytest.approx(2.786, abs=0.01)
    video = check_video(media("video/bikes.mp4"), LIMITS)
    assert video.frames == 75 and video.seconds == pytest.approx(3.0, abs=0.05)


def test_grayscale_images_of_the_corpus_pass() -> None:
    assert check_image(media("images/camera.jpg"), LIMITS).width > 0


def test_truncated_jpeg_is_rejected_after_a_valid_header() -> None:
    assert reason(check_image, builders.corrupt_jpeg(media("images/chelsea.jpg"))) == (
        "image_decode_error"
    )


def test_garbage_is_not_an_image_audio_or_video() -> None:
    garbage = builders.garbage_bytes()
    assert reason(check_image, garbage) == "image_decode_error"
    assert reason(check_audio, garbage) == "audio_decode_error"
    assert reason(check_video, garbage) == "video_decode_error"


def test_decompression_bomb_is_rejected_from_the_header_without_decoding() -> None:
    bomb = builders.png_bomb_header(100_000, 100_000)
    assert len(bomb) < 1000
    with pytest.raises(Rejected) as rejected:
        check_image(bomb, LIMITS)
    assert rejected.value.reason == "image_too_large"
    assert "100000x100000" in rejected.value.detail


def test_pixel_limit_is_configurable() -> None:
    small = MediaLimits(max_image_pixels=10_000, max_media_bytes=2**30, video_probe_frames=1)
    assert reason(check_image, media("images/astronaut.jpg"), small) == "image_too_large"


def test_byte_limit_and_empty_files() -> None:
    tiny = MediaLimits(max_image_pixels=10**9, max_media_bytes=100, video_probe_frames=1)
    assert reason(check_image, media("images/astronaut.jpg"), tiny) == "media_too_large"
    assert reason(check_audio, b"") == "empty_media"


def test_broken_and_empty_audio() -> None:
    assert reason(check_audio, builders.truncated_wav(media("audio/goforward.wav"))) == (
        "audio_decode_error"
    )
    assert reason(check_audio, builders.empty_wav()) == "empty_media"
    assert check_audio(builders.silent_wav(0.5), LIMITS).seconds == pytest.approx(0.5)


def test_video_without_moov_atom_is_rejected_by_decord_and_pyav() -> None:
    with pytest.raises(Rejected) as rejected:
        check_video(builders.truncated_mp4(media("video/bikes.mp4")), LIMITS)
    assert rejected.value.reason == "video_decode_error"
    assert "decord" in rejected.value.detail and "PyAV" in rejected.value.detail


def test_text_must_be_utf8_and_may_be_empty() -> None:
    assert check_text("héllo") == "héllo"
    assert check_text("   ") == "   "  # the caller drops it and keeps the document
    with pytest.raises(Rejected, match="invalid_utf8"):
        check_text("bad \ud800 surrogate")
    with pytest.raises(Rejected, match="bad_segment"):
        check_text(42)


def rejection(check, data: bytes) -> Rejected:
    with pytest.raises(Rejected) as rejected:
        check(data, LIMITS)
    return rejected.value


@pytest.mark.parametrize("kept", [0, 1000, 20_000])
def test_wav_cut_after_its_header_is_truncated_with_both_durations(kept: int) -> None:
    """goforward.wav: 44,580 frames of 16-bit mono at 16 kHz (2.786 s) after a 44-byte header."""
    valid = media("audio/goforward.wav")
    cut = rejection(check_audio, valid[: 44 + 2 * kept])
    assert cut.reason == "audio_truncated"
    assert "declares 2.786 s (44580 frames)" in cut.detail
    assert f"only {kept / 16_000:.3f} s ({kept} frames)" in cut.detail


def flac(wav: bytes) -> bytes:
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="int16")
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="FLAC")
    return out.getvalue()


def test_flac_shorter_than_its_streaminfo_is_truncated() -> None:
    valid = flac(media("audio/goforward.wav"))
    assert check_audio(valid, LIMITS).frames == 44580
    for cut_at in (len(valid) // 2, len(valid) - 1):
        cut = rejection(check_audio, valid[:cut_at])
        assert cut.reason == "audio_truncated" and "declares 2.786 s" in cut.detail


def test_wav_whose_header_leaves_the_length_open_is_not_truncated() -> None:
    """Streaming writers put 0xFFFFFFFF in the data size: the length is unknown, not cut."""
    valid = bytearray(builders.silent_wav(0.5))
    data_size = valid.index(b"data") + 4
    valid[data_size : data_size + 4] = struct.pack("<I", 0xFFFFFFFF)
    assert check_audio(bytes(valid), LIMITS).seconds == pytest.approx(0.5)
