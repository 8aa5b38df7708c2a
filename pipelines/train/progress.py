"""``omni train``'s progress bar: rank 0 posts each step to a board, the driver draws it.

The workers run in Ray actors, possibly on other nodes, so the driver cannot read their
state; rank 0 posts ``(step, loss, tokens/s)`` to a small Ray actor after every optimizer
step (fire and forget: a step never waits for it) and a driver thread polls the board and
moves one tqdm bar, as ``omni tokenizers train`` and ``omni pretokenize`` do. A restarted
worker group posts to the same board, so the bar goes on from the step it resumes at.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

POLL_SECONDS = 0.5


class ProgressBoard:
    """The latest step rank 0 finished and its headline metrics (a Ray actor)."""

    def __init__(self) -> None:
        self.latest: dict[str, float] = {}

    def post(self, step: int, metrics: dict[str, float]) -> None:
        self.latest = {"step": float(step), **metrics}

    def read(self) -> dict[str, float]:
        return self.latest


@contextmanager
def progress_bar(max_steps: int, start: int, enabled: bool = True) -> Iterator[Any]:
    """A board for the workers (None when ``enabled`` is False) while a driver thread
    draws ``step/max_steps``, loss, tokens/s and the ETA from it."""
    if not enabled:
        yield None
        return
    import ray

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    stop = threading.Event()

    def draw() -> None:
        with tqdm(total=max_steps, initial=start, desc="train", unit="step",
                  dynamic_ncols=True) as bar:  # fmt: skip
            while True:
                finished = stop.wait(POLL_SECONDS)
                try:
                    latest = ray.get(board.read.remote(), timeout=10)
                except Exception:  # the board died with the cluster: the run reports it
                    return
                step = int(latest.get("step", bar.n))
                if step > bar.n:
                    postfix = {}
                    if "train/loss" in latest:
                        postfix["loss"] = f"{latest['train/loss']:.3f}"
                    if "train/tokens_per_s" in latest:
                        postfix["tok/s"] = f"{latest['train/tokens_per_s']:,.0f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(step - bar.n)
                if finished:
                    return

    thread = threading.Thread(target=draw, name="omni-train-progress", daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join(timeout=15)
        # The cluster may have gone with the run: its error is the one to see.
        with contextlib.suppress(Exception):
            ray.kill(board)
