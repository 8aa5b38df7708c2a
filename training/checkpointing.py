"""Checkpoints of a training run: DeepSpeed state, per-rank state, consolidated weights.

``<workspace>/checkpoints/<run_id>/step-NNNNNNN/`` holds

* DeepSpeed's own files (``save_checkpoint``, collective: model, optimizer partitions,
  LR scheduler), loaded back through a checkpoint engine that never unpickles arbitrary
  objects (``torch.load(weights_only=True)``);
* ``rank-R.json`` per world rank: that rank's data-stream positions per bucket and its
  Python, NumPy and torch RNG states (DeepSpeed saves no RNG state, and its ``client_state``
  lives in rank 0's file only under ZeRO 0-2);
* ``trainer.json``: step, bucket-schedule and loss-weight state, fingerprints;
* ``model/``: ``OmniModel.save`` (safetensors + model config + vocabulary layout), so
  evaluation and generation load a checkpoint without DeepSpeed;
* ``_COMPLETE.json``, written last: only a step folder with it counts. DeepSpeed's own
  ``latest`` file is written before its final barrier and may name a partial save.

On an ``s3://`` workspace every rank writes to a local staging folder and a background
thread uploads it (the next checkpoint waits for the previous upload); each rank leaves
an ``_UPLOADED-rank-R-<attempt>`` flag and rank 0's uploader writes the marker once all
flags of its attempt (worker group) exist.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from infra.storage import Storage, is_remote, join

COMPLETE = "_COMPLETE.json"
TRAINER_STATE = "trainer.json"
MODEL_DIR = "model"
UPLOADED = "_UPLOADED-rank-"
STEP_DIR = re.compile(r"^step-(\d{7,})$")
# Files of one world rank: its state, its upload flag, its ZeRO partitions (DeepSpeed's
# ``[bf16_]zero_pp_rank_<dp rank>_mp_rank_<mp>_{optim,model}_states.pt``).
RANK_FILE = re.compile(
    r"^(?:rank-(\d+)\.json|_UPLOADED-rank-(\d+)(?:-\w+)?"
    r"|(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_\w+\.pt)$"
)
log = logging.getLogger(__name__)


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank}.json"


def rank_of(relative: str) -> int | None:
    """The world rank checkpoint file ``relative`` belongs to; None for a shared file
    (DeepSpeed's ZeRO 0-2 model states, ``trainer.json``, ``model/``, the marker)."""
    match = RANK_FILE.match(relative.rsplit("/", 1)[-1])
    if match is None:
        return None
    return int(next(group for group in match.groups() if group is not None))


def needed_to_resume(relative: str, rank: int) -> bool:
    """Whether world rank ``rank`` reads checkpoint file ``relative`` when it resumes: its
    own files and the shared ones; not another rank's partitions (each rank loads only its
    own), not the consolidated ``model/``, not the upload flags."""
    if relative.startswith(f"{MODEL_DIR}/") or relative.rsplit("/", 1)[-1].startswith(UPLOADED):
        return False
    return rank_of(relative) in (None, rank)


def _deepspeed_state_classes() -> list[Any]:
    """The plain-data classes DeepSpeed's ZeRO optimizer states hold, and nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch engine, loading with ``weights_only=True``: tensors, containers,
    plain values and the few DeepSpeed state classes allow-listed by name, never an
    arbitrary pickled object."""

    def load(self, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)


# ---------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and CUDA) RNG states as JSON-able data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))

    def tensor(encoded: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


# ---------------------------------------------------------------------------- consolidation


def gathered_state_dict(module: torch.nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """The full state dict of a ZeRO-3 ``module`` on rank 0 (None elsewhere), on the CPU.

    Collective: every rank gathers the partitioned weights one submodule at a time (its
    own parameters only) and lets them go before the next, so no rank ever holds more
    than the largest submodule's weights at once; rank 0 copies each to the CPU. This is
    how DeepSpeed's 16-bit save works, written out here for copies that cannot alias a
    gather buffer and keys that match ``module.state_dict()``. A weight tied to two
    submodules is one tensor under both names.
    """
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        params = list(sub.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if rank != 0:
                continue
            for name, param in params:
                if id(param) not in copies:
                    copies[id(param)] = param.detach().to("cpu", copy=True)
                state[dot + name] = copies[id(param)]
        if rank == 0:
            for name, buffer in sub.named_buffers(recurse=False):
                if name not in sub._non_persistent_buffers_set:
                    state[dot + name] = buffer.detach().to("cpu", copy=True)
    return state if rank == 0 else None


# ---------------------------------------------------------------------------- discovery


def complete_steps(storage: Storage, run_dir: str) -> list[int]:
    """Steps of ``run_dir`` whose checkpoint is complete, ascending."""
    if not storage.exists(run_dir):
        return []
    steps = []
    for entry in storage.list(run_dir):
        match = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if match and storage.exists(join(run_dir, match.group(0), COMPLETE)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_complete(storage: Storage, run_dir: str) -> int | None:
    steps = complete_steps(storage, run_dir)
    return steps[-1] if steps else None


def read_json(storage: Storage, uri: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(uri))


def fetch_local(
    storage: Storage, step_uri: str, scratch: Path, keep: Callable[[str], bool] | None = None
) -> Path:
    """A local folder with the checkpoint ``step_uri``: itself when local, else a copy in
    ``scratch`` of the files whose path relative to it ``keep`` accepts (None = all)."""
    if not is_remote(step_uri):
        return Path(step_uri)
    target = scratch / step_uri.rstrip("/").rsplit("/", 1)[-1]
    fs, root = storage.filesystem(step_uri)
    root = root.rstrip("/")
    remote = [path for path in fs.find(root) if keep is None or keep(path[len(root) + 1 :])]
    local = [str(target / path[len(root) + 1 :]) for path in remote]
    for path in local:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    if remote:
        fs.get(remote, local)
    return target


def fetch_model(storage: Storage, step_uri: str, scratch: Path) -> Path:
    """A local copy of the checkpoint's ``model/`` alone (what evaluation and generation
    read; the optimizer partitions are many times its size), or the folder itself."""

    def in_model(relative: str) -> bool:
        return relative.startswith(f"{MODEL_DIR}/")

    return fetch_local(storage, step_uri, scratch, in_model) / MODEL_DIR


# ---------------------------------------------------------------------------- writing


class CheckpointWriter:
    """Where this rank writes a checkpoint and how it becomes complete and kept.

    ``on_complete(step, uri)`` runs on rank 0 once a checkpoint is complete (the MLflow
    tags); ``on_removed(step)`` once an old one has been pruned.
    """

    def __init__(
        self,
        storage: Storage,
        run_dir: str,
        rank: int,
        world: int,
        keep_last: int,
        attempt: str = "0",
        on_complete: Callable[[int, str], None] | None = None,
        on_removed: Callable[[int], None] | None = None,
    ) -> None:
        self.storage, self.run_dir = storage, run_dir
        self.rank, self.world, self.keep_last = rank, world, keep_last
        self.attempt = attempt
        self.on_complete, self.on_removed = on_complete, on_removed
        self.remote = is_remote(run_dir)
        self.staging = Path(tempfile.mkdtemp(prefix="omni-ckpt-")) if self.remote else None
        self._upload: threading.Thread | None = None
        self._error: BaseException | None = None

    def local_run_dir(self) -> Path:
        """The folder DeepSpeed saves into (the run folder itself when local)."""
        return self.staging if self.staging is not None else Path(self.run_dir)

    def step_uri(self, step: int) -> str:
        return join(self.run_dir, step_name(step))

    def wait(self) -> None:
        """Block until the previous upload has finished; re-raise its error."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"checkpoint upload failed: {error}") from error

    def close(self) -> None:
        """Drop the staging folder (an upload still running is waited for, its error not
        raised: :meth:`wait` reports errors; this runs on every exit)."""
        if self._upload is not None:
            self._upload.join()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)

    def local_step_dir(self, step: int) -> Path:
        folder = self.local_run_dir() / step_name(step)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def finish(self, step: int, barrier: Callable[[], None]) -> None:
        """After every rank has written its files for ``step``: publish and mark complete.

        Local: a barrier, then rank 0 writes the marker and prunes. Remote: the upload
        runs in the background; the marker follows every rank's upload flag.
        """
        if not self.remote:
            barrier()
            if self.rank == 0:
                self._complete(step)
            return
        self._upload = threading.Thread(
            target=self._upload_then_complete, args=(step,), name="checkpoint-upload", daemon=True
        )
        self._upload.start()

    def _upload_then_complete(self, step: int) -> None:
        try:
            source = self.local_run_dir() / step_name(step)
            target = self.step_uri(step)
            fs, root = self.storage.filesystem(target)
            for path in sorted(p for p in source.rglob("*") if p.is_file()):
                relative = path.relative_to(source).as_posix()
                # Each file once, from the rank that wrote it: a rank's own files by it,
                # the shared ones (DeepSpeed's model states, trainer.json, model/) by rank 0.
                owner = rank_of(relative)
                if (0 if owner is None else owner) != self.rank:
                    continue
                fs.put_file(str(path), f"{root}/{relative}")
            self.storage.write_bytes(join(target, self._flag(self.rank)), b"")
            if self.rank == 0:
                self._await_flags(target)
                self._complete(step)
            shutil.rmtree(source, ignore_errors=True)
        except BaseException as error:  # reported to the training loop by wait()
            self._error = error

    def _await_flags(self, target: str, timeout_s: float = 3600.0) -> None:
        deadline = time.monotonic() + timeout_s
        flags = [join(target, self._flag(r)) for r in range(self.world)]
        while not all(self.storage.exists(flag) for flag in flags):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish uploading {target}")
            time.sleep(1.0)

    def _flag(self, rank: int) -> str:
        """Rank ``rank``'s upload flag in this attempt: a flag left by a worker group that
        died mid-upload (before a restart) never counts for the new group's upload."""
        return f"{UPLOADED}{rank}-{self.attempt}"

    def _complete(self, step: int) -> None:
        uri = self.step_uri(step)
        marker = {"step": step, "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.storage.write_bytes(join(uri, COMPLETE), json.dumps(marker).encode())
        if self.on_complete is not None:
            self.on_complete(step, uri)
        self._prune()

    def _prune(self) -> None:
        steps = complete_steps(self.storage, self.run_dir)
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            uri = self.step_uri(old)
            self.storage.remove(join(uri, COMPLETE))  # no longer complete before it is partial
            self.storage.remove(uri, recursive=True)
            if self.on_removed is not None:
                self.on_removed(old)
