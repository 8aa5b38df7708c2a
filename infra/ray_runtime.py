"""Connecting to Ray: a bounded local instance by default, or an existing cluster.

A default local ``ray.init`` reserves 30% of RAM for the object store and starts the
dashboard (about 1 GiB more); on the 2-core, 24 GiB machines this project targets that
starves the stages themselves, so both are bounded here. Ray is imported when a
connection is made, not with this module: the config and the command line's help load
:class:`RayConfig` without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from pydantic import Field

from infra.config import Section


class RayConfig(Section):
    """Ray section of a pipeline config."""

    address: str | None = Field(
        None, description="ray://HOST:10001 or HOST:6379 of a running cluster; null = local"
    )
    num_cpus: int | None = Field(None, ge=1, description="local only; null = all cores")
    object_store_memory_mb: int = Field(1024, ge=80, description="local only")
    include_dashboard: bool = Field(False, description="local only; costs ~1 GiB RSS")


# Ray Train's placement-group cleaner asks the State API once a second whether the train
# controller is alive; without the dashboard (off locally, see RayConfig) there is no State
# API, and each failed query logged a warning: 70 of `make demo`'s 122 lines of output.
TRAIN_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_train_cleaner() -> None:
    """Worker setup hook: drop the cleaner's warnings (its errors still show)."""
    logging.getLogger(TRAIN_CLEANER_LOGGER).setLevel(logging.ERROR)


def connect(config: RayConfig) -> bool:
    """Make sure this process is connected to Ray. Returns True if it started a connection.

    An existing connection (a test session, a notebook, a Ray job's driver) is reused as
    it is, so stages can be called from inside a larger Ray program.
    """
    import ray

    if ray.is_initialized():
        return False
    if config.address:
        ray.init(address=config.address, logging_level=logging.WARNING)
        return True
    # Ray 2.60 writes ~/.ray/auth_token unless told otherwise; a local instance needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",  # never attach by accident to another user's instance
        num_cpus=config.num_cpus,
        object_store_memory=config.object_store_memory_mb * 2**20,
        include_dashboard=config.include_dashboard,
        logging_level=logging.WARNING,
        log_to_driver=True,
        runtime_env=None
        if config.include_dashboard
        else {"worker_process_setup_hook": "infra.ray_runtime.quiet_train_cleaner"},
    )
    return True


def disconnect(started: bool) -> None:
    """Shut Ray down only if :func:`connect` started the connection."""
    import ray

    if started and ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def session(config: RayConfig) -> Iterator[None]:
    """One connection for a block of work: stages inside it reuse it instead of starting
    and stopping Ray each (see :func:`connect`)."""
    started = connect(config)
    try:
        yield
    finally:
        disconnect(started)
