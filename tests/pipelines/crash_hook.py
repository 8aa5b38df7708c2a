"""A Ray worker setup hook for tests: a medium that crashes its decoder natively.

``install`` (passed as ``runtime_env={"worker_process_setup_hook": ...}``) makes the shard
stage's image check and the image tokenizer abort the whole process, as a segfault in a C
decoder would, on image bytes that contain :data:`POISON`. Nothing in Python can catch
it; only the stages' crash isolation can keep such a medium from failing its shard.
"""

from __future__ import annotations

import os
from typing import Any

POISON = b"POISON-PILL"


def _abort_on_poison(data: Any) -> None:
    if isinstance(data, (bytes, bytearray, memoryview)) and POISON in bytes(data):
        os.abort()


def install() -> None:
    from pipelines.shard import media_checks
    from tokenization.image import ImageTokenizer

    check_image = media_checks.CHECKS["image"]

    def check(data: bytes, limits: Any) -> Any:
        _abort_on_poison(data)
        return check_image(data, limits)

    media_checks.CHECKS["image"] = check
    original = ImageTokenizer.preprocess

    def preprocess(self: ImageTokenizer, image: Any, side: int | None = None) -> Any:
        _abort_on_poison(image)
        return original(self, image, side)

    ImageTokenizer.preprocess = preprocess
