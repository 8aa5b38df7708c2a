"""Waiting for the Ray cluster to offer the training workers' resources.

Ray Train waits forever for resources a cluster lacks, and an autoscaling cluster (the
shipped ``raycluster.yaml`` scales its workers from 0) adds nodes only for resources
something asks for. So the driver asks: a placement group of the workers' bundles, the
demand the autoscaler scales for, waited on up to ``train.resources_timeout_s`` with one
progress line, then removed so that Ray Train places the workers on the nodes it brought.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from infra.config import ConfigError
from training.train_config import TrainConfig


def worker_bundle(train: TrainConfig) -> dict[str, float]:
    """What one training worker takes (Ray Train's ``resources_per_worker``, GPU included)."""
    return {"CPU": train.cpus_per_worker, **({"GPU": 1.0} if train.use_gpu else {})}


def _offered() -> str:
    total = ray.cluster_resources()
    return f"{total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"


def wait_for_workers(train: TrainConfig, out: TextIO = sys.stderr) -> None:
    """Return once the cluster can place ``train.num_workers`` workers; ConfigError naming
    the fields after ``train.resources_timeout_s`` without them."""
    bundle = worker_bundle(train)
    asked = f"{train.num_workers} workers x {bundle}"
    group = placement_group([dict(bundle) for _ in range(train.num_workers)], strategy="PACK")
    try:
        ready, _ = ray.wait([group.ready()], timeout=1.0)
        if ready:
            return
        started = time.monotonic()
        print(
            f"omni train: waiting up to {train.resources_timeout_s:g} s "
            f"(train.resources_timeout_s) for the Ray cluster to offer {asked}; "
            f"it has {_offered()}",
            file=out,
            flush=True,
        )
        remaining = max(0.0, train.resources_timeout_s - (time.monotonic() - started) - 1.0)
        ready, _ = ray.wait([group.ready()], timeout=remaining)
        if not ready:
            raise ConfigError(
                f"train.num_workers={train.num_workers} x {bundle}: the Ray cluster did not "
                f"offer them within train.resources_timeout_s={train.resources_timeout_s:g} s "
                f"(it has {_offered()}); add nodes, or lower train.num_workers / "
                "train.cpus_per_worker"
            )
    finally:
        remove_placement_group(group)
