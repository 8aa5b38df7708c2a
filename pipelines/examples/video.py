"""Short clips of one handwritten digit drifting across the page, as H.264 MP4.

A clip is ``FRAMES`` frames at ``FPS`` (one second): the digit, drawn at 5/8 of the frame,
moves from one side towards the other along ``direction``. Encoding is single-threaded
libx264 with fixed settings and no timestamps from the clock, so the same frames give the
same bytes; decord (the pipeline's video reader) decodes every frame.
"""

from __future__ import annotations

import io

import numpy as np

FRAMES = 8
FPS = 8
DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (row, column)


def drifting_frames(glyph: np.ndarray, side: int, direction: str) -> np.ndarray:
    """(FRAMES, side, side) uint8: ``glyph`` (g, g), dark on white, moving ``direction``.

    The glyph starts displaced against the direction by a third of the free margin and ends
    displaced along it by as much, so it never leaves the frame.
    """
    if direction not in _STEP:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    size = glyph.shape[0]
    margin = side - size
    if margin < 2:
        raise ValueError(f"glyph of {size} px leaves no room to move in {side} px")
    centre = margin / 2
    row_step, column_step = _STEP[direction]
    frames = np.full((FRAMES, side, side), 255, dtype=np.uint8)
    for index, progress in enumerate(np.linspace(-1.0, 1.0, FRAMES)):
        top = int(round(centre + row_step * progress * centre))
        left = int(round(centre + column_step * progress * centre))
        frames[index, top : top + size, left : left + size] = glyph
    return frames


def mp4_bytes(frames: np.ndarray) -> bytes:
    """Grayscale frames (T, H, W) uint8 -> H.264 MP4 (yuv420p, FPS frames per second).

    ``H`` and ``W`` must be even (4:2:0 chroma). One encoder thread: x264's frame threads
    would make the bitstream depend on scheduling.
    """
    import av

    _, height, width = frames.shape
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(
            "libx264",
            rate=FPS,
            options={"crf": "18", "preset": "veryfast", "threads": "1",
                     "x264-params": "threads=1:sliced-threads=0"},
        )  # fmt: skip
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="gray")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()
