"""The local Ray instance's worker setup hook."""

from __future__ import annotations

import logging

import pytest

from infra import ray_runtime


def test_the_state_api_warning_of_the_placement_group_cleaner_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without the dashboard, Ray Train's cleaner warns every second; nothing else is hidden."""
    logger = logging.getLogger(ray_runtime._STATE_API_LOGGER)
    filters = list(logger.filters)
    try:
        ray_runtime.quiet_state_api_warning()
        with caplog.at_level(logging.WARNING, logger=logger.name):
            logger.warning(
                "Failed to query Ray Train Controller actor state. "
                "State API may be temporarily unavailable. Continuing to monitor."
            )
            logger.warning("Failed to remove placement group")
    finally:
        logger.filters = filters
    assert [r.getMessage() for r in caplog.records] == ["Failed to remove placement group"]
