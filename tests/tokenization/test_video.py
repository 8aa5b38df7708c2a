"""Video tokenizer: frame sampling, decoder fallback, errors, batching, against real clips."""

from __future__ import annotations

import io
from pathlib import Path

import av
import decord
import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from tests.builders import garbage_bytes, truncated_mp4
from tokenization import video
from tokenization.errors import TokenizerInputError
from tokenization.video import VideoConfig, VideoTokenizer, read_frames, sample_indices

VIDEOS = sorted((Path(__file__).resolve().parents[2] / "examples/corpus/media/video").glob("*.mp4"))


class StandInImageTokenizer:
    """The ImageTokenizer API on 16x16 images: one id per 4x4 patch, its mean grey level."""

    tokens_per_image = 16

    def __init__(self) -> None:
        self.encoded_batches: list[int] = []

    def preprocess(self, image: Image.Image | bytes, side: int | None = None) -> torch.Tensor:
        """-> (3, side, side) in [0, 1], side 16 by default."""
        side = side or 16
        pixels = np.asarray(image.convert("RGB").resize((side, side)), dtype=np.float32) / 255
        return torch.from_numpy(pixels).permute(2, 0, 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 16, 16) -> (B, 16) ids in [0, 255]."""
        self.encoded_batches.append(pixels.shape[0])
        grey = torch.nn.functional.avg_pool2d(pixels.mean(1, keepdim=True), 4)
        return (grey.flatten(1) * 255).round().long()

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, 16) -> (B, 3, 16, 16)."""
        grey = (ids.float() / 255).reshape(-1, 1, 4, 4)
        return torch.nn.functional.interpolate(grey, scale_factor=4).expand(-1, 3, -1, -1)


def encode_clip(count: int, container: str = "mp4", codec: str = "mpeg4") -> bytes:
    """A 32x24 clip of ``count`` flat frames (grey 20, 60, 100, ...) encoded in memory."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        output.start_encoding()
        for level in range(count):
            image = np.full((24, 32, 3), 20 + 40 * level, np.uint8)
            output.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        output.mux(stream.encode())
    return buffer.getvalue()


@pytest.fixture
def tokenizer() -> VideoTokenizer:
    return VideoTokenizer(StandInImageTokenizer(), VideoConfig())


def test_sample_videos_give_frames_times_tokens_per_image(tokenizer: VideoTokenizer) -> None:
    assert len(VIDEOS) == 4
    for path in VIDEOS:
        ids = tokenizer.encode([path.read_bytes()])
        assert ids.shape == (1, 8 * 16) and ids.dtype == torch.long
    assert tokenizer.tokens_per_video == 128


def test_indices_are_uniform_and_include_both_ends() -> None:
    assert sample_indices(75, 8).tolist() == [0, 11, 21, 32, 42, 53, 63, 74]
    assert sample_indices(89, 8).tolist() == [0, 13, 25, 38, 50, 63, 75, 88]
    assert sample_indices(3, 8).tolist() == [0, 0, 1, 1, 1, 1, 2, 2]


def test_read_frames_returns_the_frames_at_those_indices() -> None:
    data = VIDEOS[0].read_bytes()
    with av.open(io.BytesIO(data)) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(every) == 75
    frames = read_frames(data, 8)
    assert frames.dtype == np.uint8 and frames.shape == (8, *every[0].shape)
    assert np.array_equal(frames, np.stack([every[i] for i in sample_indices(75, 8)]))


@pytest.mark.parametrize("broken", ["truncated", "garbage"])
def test_undecodable_input_names_both_decoders(broken: str) -> None:
    data = truncated_mp4(VIDEOS[0].read_bytes()) if broken == "truncated" else garbage_bytes()
    with pytest.raises(TokenizerInputError, match=r"decord: .+; PyAV: .+") as caught:
        read_frames(data, 8)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 500


def test_encode_names_the_broken_clip_in_a_batch(tokenizer: VideoTokenizer) -> None:
    with pytest.raises(TokenizerInputError, match=r"^video 1: cannot decode video: decord"):
        tokenizer.encode([VIDEOS[0].read_bytes(), garbage_bytes()])


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_one_frame_video_gives_eight_copies(codec: str, tokenizer: VideoTokenizer) -> None:
    frames = read_frames(encode_clip(1, codec=codec), 8)
    assert frames.shape == (8, 24, 32, 3)
    assert (frames == frames[0]).all() and abs(int(frames.mean()) - 20) <= 2
    assert tokenizer.encode([encode_clip(1, codec=codec)]).shape == (1, 128)


def test_short_clip_repeats_frames_in_order() -> None:
    levels = read_frames(encode_clip(3), 8).mean(axis=(1, 2, 3))
    assert np.allclose(levels, [20, 20, 60, 60, 60, 60, 100, 100], atol=3)


def test_zero_frame_video_is_rejected() -> None:
    with pytest.raises(TokenizerInputError, match="no frames"):
        read_frames(encode_clip(0, container="avi"), 8)


def test_falls_back_to_pyav_when_decord_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    data = VIDEOS[2].read_bytes()
    expected = read_frames(data, 8)

    def broken_reader(*args: object, **kwargs: object) -> None:
        raise decord._ffi.base.DECORDError("[08:00:00] video_reader.cc:1: simulated failure")

    monkeypatch.setattr(video.decord, "VideoReader", broken_reader)
    assert np.array_equal(read_frames(data, 8), expected)
    with pytest.raises(TokenizerInputError, match="decord: DECORDError: simulated failure; PyAV"):
        read_frames(garbage_bytes(), 8)


def test_batch_encode_equals_one_by_one_in_one_image_batch(tokenizer: VideoTokenizer) -> None:
    clips = [path.read_bytes() for path in VIDEOS]
    batched = tokenizer.encode(clips)
    assert tokenizer.image_tokenizer.encoded_batches == [4 * 8]
    one_by_one = torch.cat([tokenizer.encode([clip]) for clip in clips])
    assert torch.equal(batched, one_by_one)
    assert tokenizer.encode([]).shape == (0, 128)


def test_decode_gives_frames_in_order(tokenizer: VideoTokenizer) -> None:
    ids = tokenizer.encode([encode_clip(3), VIDEOS[1].read_bytes()])
    frames = tokenizer.decode(ids)
    assert frames.shape == (2, 8, 3, 16, 16)
    assert np.allclose(frames[0].mean(dim=(1, 2, 3)) * 255, [20, 20, 60, 60, 60, 60, 100, 100],
                       atol=3)  # fmt: skip
    with pytest.raises(ValueError, match=r"\(B, 128\)"):
        tokenizer.decode(ids[:, :100])


def test_frames_count_is_configurable_and_validated() -> None:
    tokenizer = VideoTokenizer(StandInImageTokenizer(), VideoConfig(frames=3))
    assert tokenizer.encode([VIDEOS[0].read_bytes()]).shape == (1, 48)
    with pytest.raises(ValidationError):
        VideoConfig(frames=0)
    with pytest.raises(ValidationError):
        VideoConfig(fps=2)


def test_with_the_real_image_tokenizer() -> None:
    from tokenization.image import ImageTokenizer, ImageTokenizerConfig

    torch.manual_seed(0)
    image_tokenizer = ImageTokenizer.from_config(ImageTokenizerConfig())
    tokenizer = VideoTokenizer(image_tokenizer, VideoConfig())
    clips = [path.read_bytes() for path in VIDEOS]
    ids = tokenizer.encode(clips)
    per_image, side = image_tokenizer.tokens_per_image, image_tokenizer.config.resolution
    assert ids.shape == (4, 8 * per_image) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < image_tokenizer.vocab_size
    assert torch.equal(ids[2:3], tokenizer.encode([clips[2]]))
    assert tokenizer.decode(ids).shape == (4, 8, 3, side, side)
