"""Connecting to a local Ray: what the workers of a local instance are set up with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

SCRIPT = """
import logging, time, ray
from infra.ray_runtime import TRAIN_CLEANER_LOGGER, RayConfig, connect
connect(RayConfig(num_cpus=1, object_store_memory_mb=80))

@ray.remote
def log() -> None:
    logging.getLogger(TRAIN_CLEANER_LOGGER).warning("CLEANER-WARNING")
    logging.getLogger(TRAIN_CLEANER_LOGGER).error("CLEANER-ERROR")
    logging.getLogger("elsewhere").warning("OTHER-WARNING")

ray.get(log.remote())
time.sleep(2)  # the log monitor forwards worker output to the driver asynchronously
"""


def test_a_local_instance_drops_only_the_train_cleaners_warnings() -> None:
    """Without the dashboard Ray Train's placement-group cleaner cannot reach the State API
    and warned once a second (70 of `make demo`'s 122 lines); its errors and every other
    worker warning still reach the driver."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "OTHER-WARNING" in output and "CLEANER-ERROR" in output, output[-3000:]
    assert "CLEANER-WARNING" not in output, output[-3000:]
