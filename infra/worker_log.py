"""A worker's full log in a file under the workspace: what the console leaves out.

The console shows warnings and errors only (and drops the known library noise,
:mod:`infra.console_noise`); a rank's INFO records, its prints and its warnings go to
``<dir>/rank-<r>.log`` as well, so a person can read what a worker did after the run,
without Ray's session directory (which a finished local instance deletes at the next
start, and which on a cluster lives on another host).

A local file is appended to by each worker group of the run (restarts, ``--resume``),
each after a header line. On remote storage the file is written locally and uploaded
when the worker ends, as ``rank-<r>-<start>.log`` (an object cannot be appended to); a
worker killed outright loses that upload, Ray's own log of it stays.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from infra.storage import Storage, is_remote, join

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that do not propagate to the root (DeepSpeed prints through its own handler).
OWN_HANDLERS = ("DeepSpeed",)


def worker_log_dir(workspace: str, stage: str, run_id: str) -> str:
    """Where the workers of ``stage``'s run ``run_id`` write their logs (``rank-<r>.log``)."""
    return join(workspace, "logs", stage, run_id)


class _Tee:
    """A text stream that writes to the original stream and to the log file."""

    def __init__(self, original: IO[str], copy: IO[str]) -> None:
        self.original, self.copy = original, copy

    def write(self, text: str) -> int:
        with contextlib.suppress(ValueError):  # the file closed under a late writer thread
            self.copy.write(text)
        return self.original.write(text)

    def flush(self) -> None:
        with contextlib.suppress(ValueError):
            self.copy.flush()
        self.original.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding: the original's
        return getattr(self.original, name)


@contextlib.contextmanager
def worker_log(storage: Storage, directory: str, rank: int) -> Iterator[str]:
    """Copy this process's log records (INFO and up), stdout and stderr into the rank's
    log file under ``directory`` while the block runs; yields the file's URI."""
    started = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    remote = is_remote(directory)
    if remote:
        uri = join(directory, f"rank-{rank}-{started}.log")
        local = Path(tempfile.mkdtemp(prefix="omni-log-")) / "rank.log"
    else:
        uri = join(directory, f"rank-{rank}.log")
        local = Path(uri)
        local.parent.mkdir(parents=True, exist_ok=True)
    stream = local.open("a", encoding="utf-8", buffering=1)
    stream.write(f"==== rank {rank}: pid {os.getpid()} on {socket.gethostname()}, "
                 f"started {started} UTC\n")  # fmt: skip
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    loggers = [root, *(logging.getLogger(name) for name in OWN_HANDLERS)]
    level = root.level
    stdout, stderr = sys.stdout, sys.stderr
    # The root logs INFO for the file; the console shows warnings and errors only: the
    # root's handlers (Ray's in its workers) are raised to WARNING while the block runs,
    # and where there were none (Python's last resort printed warnings), a stderr handler
    # stands in for it.
    console = [] if root.handlers else [logging.StreamHandler(stderr)]
    raised = {h: h.level for h in root.handlers if h.level < logging.WARNING}
    for h in [*raised, *console]:
        h.setLevel(logging.WARNING)
    for logger in loggers:
        logger.addHandler(handler)
    for h in console:
        root.addHandler(h)
    root.setLevel(min(root.getEffectiveLevel(), logging.INFO))
    sys.stdout, sys.stderr = _Tee(stdout, stream), _Tee(stderr, stream)
    try:
        yield uri
    except BaseException as error:
        logging.getLogger(__name__).error("worker ended by %r", error, exc_info=True)
        raise
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        for logger in loggers:
            logger.removeHandler(handler)
        for h in console:
            root.removeHandler(h)
        for h, was in raised.items():
            h.setLevel(was)
        root.setLevel(level)
        stream.close()
        if remote:
            with contextlib.suppress(Exception):  # never hide the run's own outcome
                storage.write_bytes(uri, local.read_bytes())
            local.unlink(missing_ok=True)
            local.parent.rmdir()
