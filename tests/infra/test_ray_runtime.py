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
import logging, os, time, warnings, ray
from infra.console_noise import TRAIN_CLEANER_LOGGER
from infra.ray_runtime import RayConfig, connect
connect(RayConfig(num_cpus=1, object_store_memory_mb=80))

def noise() -> None:
    logging.basicConfig()
    logging.getLogger(TRAIN_CLEANER_LOGGER).warning("CLEANER-WARNING")
    logging.getLogger(TRAIN_CLEANER_LOGGER).error("CLEANER-ERROR")
    logging.getLogger("elsewhere").warning("OTHER-WARNING")
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
    logging.getLogger("DeepSpeed").warning("DEEPSPEED-OTHER")
    logging.getLogger("ray.train.torch.config").warning("Setting up process group for: env://")
    warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Use ...",
                  FutureWarning)
    warnings.warn("OTHER-FUTURE", FutureWarning)
    print("PREEMPTION-WATCHER", os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"))

noise()  # the driver
ray.get(ray.remote(noise).remote())
time.sleep(2)  # the log monitor forwards worker output to the driver asynchronously
"""


def test_a_local_instance_drops_only_the_known_library_noise() -> None:
    """The known library lines (infra.console_noise) are dropped in the driver and in every
    worker: Ray Train's placement-group cleaner warned once a second without the dashboard
    (70 of `make demo`'s 122 lines), DeepSpeed's CPU notice, torch's FutureWarning, Ray
    Train's banners. Errors and every other warning still reach the console."""
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
    for kept in ("OTHER-WARNING", "CLEANER-ERROR", "DEEPSPEED-OTHER", "OTHER-FUTURE"):
        assert output.count(kept) == 2, (kept, output[-3000:])  # driver and worker
    for dropped in ("CLEANER-WARNING", "Setting accelerator", "Setting up process group",
                    "all_gather_into_tensor"):  # fmt: skip
        assert dropped not in output, (dropped, output[-3000:])
    assert output.count("PREEMPTION-WATCHER 0") == 2, output[-3000:]
