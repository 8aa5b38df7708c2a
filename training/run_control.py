"""Who may write a run, and whether it should stop: one small control file per run.

``<checkpoints>/<run_id>/_CONTROL.json`` holds ``{"owner": TOKEN, "stop": bool}``. The
driver of ``omni train`` writes a fresh owner token when it starts (or resumes) the run,
and sets ``stop`` when it receives SIGTERM or SIGINT. Rank 0 reads the file before every
step and shares what it found with the other ranks in the step's first all-reduce, so all
ranks stop at the same step; a worker whose token is no longer the owner's belongs to a
driver that was killed and replaced: it is fenced off and exits before writing anything.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from infra.storage import Storage, join

CONTROL = "_CONTROL.json"


class FencedOff(RuntimeError):
    """Another ``omni train`` process owns this run now."""


@dataclass(frozen=True)
class ControlState:
    owner: str
    stop: bool


class RunControl:
    """Reads and writes a run's control file."""

    def __init__(self, storage: Storage, run_dir: str) -> None:
        self.storage, self.uri = storage, join(run_dir, CONTROL)

    def claim(self) -> str:
        """Make this process the run's owner; returns its token (older owners are fenced)."""
        token = uuid.uuid4().hex
        self._write(ControlState(token, stop=False))
        return token

    def request_stop(self, token: str) -> None:
        """Ask the workers of owner ``token`` to checkpoint and stop."""
        self._write(ControlState(token, stop=True))

    def read(self) -> ControlState | None:
        if not self.storage.exists(self.uri):
            return None
        data = json.loads(self.storage.read_bytes(self.uri))
        return ControlState(str(data["owner"]), bool(data["stop"]))

    def _write(self, state: ControlState) -> None:
        payload = {"owner": state.owner, "stop": state.stop}
        self.storage.write_bytes(self.uri, json.dumps(payload).encode())
