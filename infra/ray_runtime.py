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
from infra.console_noise import quiet_libraries, quiet_local_ray_environment


class RayConfig(Section):
    """Ray section of a pipeline config."""

    address: str | None = Field(
        None, description="ray://HOST:10001 or HOST:6379 of a running cluster; null = local"
    )
    num_cpus: int | None = Field(None, ge=1, description="local only; null = all cores")
    object_store_memory_mb: int = Field(1024, ge=80, description="local only")
    include_dashboard: bool = Field(False, description="local only; costs ~1 GiB RSS")


def setup_worker() -> None:
    """Setup hook of every worker of a local instance: drop the known library noise, and
    point Ray's State API at this instance. Ray Train's placement-group cleaner queries
    it with no address; with a second local Ray on the machine (another user's, a test
    session's) the address lookup raised and printed a 30-line traceback on every run.
    """
    import ray

    quiet_libraries()
    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def connect(config: RayConfig) -> bool:
    """Make sure this process is connected to Ray. Returns True if it started a connection.

    An existing connection (a test session, a notebook, a Ray job's driver) is reused as
    it is, so stages can be called from inside a larger Ray program.
    """
    import ray

    quiet_libraries()
    if ray.is_initialized():
        return False
    if config.address:
        ray.init(address=config.address, logging_level=logging.WARNING)
        return True
    # Ray 2.60 writes ~/.ray/auth_token unless told otherwise; a local instance needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    quiet_local_ray_environment()
    ray.init(
        address="local",  # never attach by accident to another user's instance
        num_cpus=config.num_cpus,
        object_store_memory=config.object_store_memory_mb * 2**20,
        include_dashboard=config.include_dashboard,
        logging_level=logging.WARNING,
        log_to_driver=True,
        runtime_env={"worker_process_setup_hook": "infra.ray_runtime.setup_worker"},
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
