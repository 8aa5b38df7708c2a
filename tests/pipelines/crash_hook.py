"""A Ray worker setup hook for tests: a medium that crashes its decoder natively.

``install`` (passed as ``runtime_env={"worker_process_setup_hook": ...}``) makes the image
tokenizer abort the whole process, as a segfault in a C decoder would, on image bytes that
contain :data:`POISON`. Nothing in Python can catch it; only the stage's crash isolation
can keep such a medium from failing its shard.
"""

from __future__ import annotations

import os
from typing import Any

POISON = b"POISON-PILL"


def install() -> None:
    from tokenization.image import ImageTokenizer

    original = ImageTokenizer.preprocess

    def preprocess(self: ImageTokenizer, image: Any) -> Any:
        if isinstance(image, (bytes, bytearray, memoryview)) and POISON in bytes(image):
            os.abort()
        return original(self, image)

    ImageTokenizer.preprocess = preprocess
