"""Fault injection for the evaluation crash tests: SIGKILL the evaluating process right
after one named step, as a lost node or the OOM killer would (no handler, no atexit).

``python -m tests.pipelines.eval_crash_hook POINT CONFIG RUN_ID SUITE`` runs one sweep of
``RUN_ID`` with ``SUITE`` and dies after the first checkpoint reaches ``POINT``:

* ``evaluated``: the child run holds its metrics, nothing is published;
* ``published``: ``result.json`` exists, nothing is mirrored, the child is RUNNING;
* ``mirrored``: the training run has the metrics, the child is RUNNING;
* ``child_ended``: the child run is FINISHED, there is no done record.

Like ``crash_hook``, it replaces the production functions in this process only.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from evaluation.claims import ClaimStore
from pipelines.eval import child_run, publication

POINTS = {
    "evaluated": (child_run, "log_results"),
    "published": (ClaimStore, "publish"),
    "mirrored": (publication, "mirror"),
    "child_ended": (publication, "end_child"),
}


def install(point: str) -> None:
    """Make the step named ``point`` kill this process as soon as it returns."""
    owner, name = POINTS[point]
    original = getattr(owner, name)

    def then_die(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(owner, name, then_die)


def main() -> None:
    point, config_path, run_id, suite = sys.argv[1:5]
    install(point)
    from pipelines.config import load_pipeline_config
    from pipelines.eval import stage as eval_stage

    eval_stage.sweep(load_pipeline_config(config_path), run_ids=[run_id], suite=suite)
    raise SystemExit(f"the sweep finished without reaching {point}")


if __name__ == "__main__":
    main()
