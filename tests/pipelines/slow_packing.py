"""A Ray worker setup hook for the packing test: each packing task takes 0.3 s longer,
so a test can kill the stage while it packs (``runtime_env={"worker_process_setup_hook":
"tests.pipelines.slow_packing.install"}``)."""

from __future__ import annotations

import time
from typing import Any


def install() -> None:
    from pipelines.pretokenize import packing as pretokenize_packing

    original = pretokenize_packing.pack_tar

    def slow(row: dict[str, Any], settings: Any) -> dict[str, Any]:
        time.sleep(0.3)
        return original(row, settings)

    pretokenize_packing.pack_tar = slow
