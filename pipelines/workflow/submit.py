"""``omni submit``: a stage (or the whole workflow) as a Ray Job on a remote cluster.

The job carries the project in its ``runtime_env`` (``working_dir`` = this source tree
minus build outputs and data; ``pip`` = the project's requirements at the versions
installed here, or none when the cluster image has them; or an ``image_uri``), so a
cluster with only Ray installed runs it. The config travels resolved, as JSON in the
job's environment; the job runs in the submitting directory when the cluster shares
the filesystem (relative paths then mean what they mean here), else in the shipped
project. The ``submission_id`` is derived from the work alone (the job's label, the
resolved config less how it is packaged and retried, the fingerprint of the corpus it
reads), never from how far the pipeline got or where it was submitted from, so
submitting the same work again, at any point, attaches to its job instead of starting a
second; a failed or stopped job is followed by ``-rN`` retries. The requirements travel
as the lock (``constraints.txt``) pins them, transitive ones included. ``omni run``
with a remote ``ray.address`` goes the same way (:func:`jobs_address`): a driver outside
the cluster would ship nothing to it, and would die with the laptop that runs it.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.config import ConfigError, fingerprint, validate
from infra.storage import Storage, StorageError
from pipelines.corpus import absolute

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

    from pipelines.config import PipelineConfig

PROJECT = Path(__file__).resolve().parents[2]
CONFIG_ENV = "OMNI_CONFIG"  # the resolved config, JSON
CWD_ENV = "OMNI_SUBMIT_CWD"  # the submitting directory
DISTRIBUTION = "omni-dfm"
# Never shipped: environments, caches, VCS, outputs. The cluster reads data from the config's URIs.
EXCLUDES = [
    ".venv",
    ".git",
    ".ci",
    "work",
    "mlruns",
    "benchmarks",
    "tests",
    ".torch_extensions",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "__pycache__",
]
CORPUS_STAGES = ("shard", "run")  # only these read the raw corpus (examples/corpus)
ACTIVE = ("PENDING", "RUNNING", "SUCCEEDED")  # a job with one of these states is attached to
LOCAL_ADDRESSES = ("auto", "local")  # ray.address values (besides null) that mean "run here"
DASHBOARD_PORT = 8265  # Ray's default port of the dashboard, which serves the Jobs API


# ------------------------------------------------------------------ where and what


def jobs_address(ray_address: str | None) -> str | None:
    """The Jobs API of the cluster ``ray.address`` names, or None when it means this machine.

    ``ray://HOST:10001`` and ``HOST:6379`` give ``http://HOST:8265`` (Ray's default
    dashboard port; ``omni run --address`` names another); an ``http(s)://`` address is
    the Jobs API itself.
    """
    if not ray_address or ray_address in LOCAL_ADDRESSES:
        return None
    if ray_address.startswith(("http://", "https://")):
        return ray_address
    host = ray_address.removeprefix("ray://").rsplit(":", 1)[0]
    return f"http://{host}:{DASHBOARD_PORT}"


def job_label(stage: str, start: str | None = None) -> str:
    """What the job runs, as its submission id names it: ``shard``, ``run``, ``run-from-train``."""
    return f"{stage}-from-{start}" if start else stage


# ------------------------------------------------------------------ packaging


LOCK = PROJECT / "constraints.txt"


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` of a pip constraints file (``name==version`` lines)."""
    from packaging.utils import canonicalize_name

    lock = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            lock[canonicalize_name(name)] = version.strip()
    return lock


def runtime_closure() -> set[str]:
    """Canonical names of every distribution the project needs at run time: its
    requirements (no extras of its own), theirs, and so on, with the extras each asks
    for, as the markers of this Python select them. Ray is left out with what only it
    needs: the cluster's Ray is the one the job runs."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    stack: list[tuple[str, frozenset[str]]] = [(DISTRIBUTION, frozenset())]
    while stack:
        name, extras = stack.pop()
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requirements:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker and not any(marker.evaluate({"extra": e}) for e in extras or {""}):
                continue
            key = canonicalize_name(requirement.name)
            if key == "ray" or key in seen:
                continue
            seen.add(key)
            stack.append((requirement.name, frozenset(requirement.extras)))
    return seen


def pinned_requirements() -> list[str]:
    """``name==version`` for everything :func:`runtime_closure` holds, at the lock's
    version (the installed one, local label like ``+cpu`` dropped, if the lock lacks it),
    so the cluster resolves nothing of its own: it runs the versions the tests ran."""
    lock = read_lock()
    pinned = []
    for name in sorted(runtime_closure()):
        version = lock.get(name)
        if version is None:
            try:
                version = importlib.metadata.version(name).split("+", 1)[0]
            except importlib.metadata.PackageNotFoundError:
                continue  # a requirement of another platform
        pinned.append(f"{name}=={version}")
    return pinned


def runtime_env(config: PipelineConfig, stage: str, submission_id: str) -> dict[str, Any]:
    """The job's ``runtime_env``: the source tree, its requirements, the config."""
    if not (PROJECT / "configs").is_dir():
        raise ConfigError(f"omni submit ships a source checkout; {PROJECT} has no configs/")
    section = config.submit.runtime_env
    excludes = EXCLUDES + section.excludes
    if stage not in CORPUS_STAGES:
        excludes.append("examples")
    env: dict[str, Any] = {
        "working_dir": str(PROJECT),
        "excludes": excludes,
        "env_vars": {
            "MLFLOW_DISABLE_TELEMETRY": "true",
            **section.env_vars,
            CONFIG_ENV: json.dumps(config.model_dump(mode="json")),
            CWD_ENV: os.getcwd(),
            "OMNI_SUBMISSION_ID": submission_id,
        },
    }
    if section.image_uri:
        env["image_uri"] = section.image_uri
    elif section.pip is not None:
        packages = pinned_requirements() if section.pip == "pinned" else section.pip
        env["pip"] = {"packages": packages, "pip_check": False}
    return env


NOT_THE_WORK = ("submit", "workflow")  # how a job is packaged, retried and placed


def resolved_work(config: PipelineConfig) -> dict[str, Any]:
    """The config as the work it describes: every path absolute (a relative workspace
    submitted from two folders is two workspaces; an absolute one is one), and the
    sections that do not change what is computed left out."""
    dump = config.model_dump(mode="json", exclude=set(NOT_THE_WORK))
    dump["workspace"] = absolute(config.workspace)
    for spec in dump["corpus"]["inputs"]:
        spec["uri"] = absolute(spec["uri"])
        if spec.get("media_root"):
            spec["media_root"] = absolute(spec["media_root"])
    return dump


def input_fingerprint(config: PipelineConfig) -> str | None:
    """The fingerprint of the corpus the pipeline reads (every input file's identity: name,
    size, version), or None when this machine cannot list it. It is known before any
    stage ran and does not change as stages finish."""
    from pipelines.corpus import expand_inputs

    try:
        files = expand_inputs(config.corpus, Storage(config.storage))
    except (StorageError, OSError):  # inputs this machine cannot read
        return None
    return fingerprint([(f.namespace, f.format, f.size, f.version) for f in files])


def submission_base(config: PipelineConfig, label: str, inputs: str | None) -> str:
    """``omni-<label>-<hash>`` of the work: the label (``shard``, ``run``,
    ``run-from-train``), :func:`resolved_work` and the corpus fingerprint ``inputs``.
    Neither the progress of the pipeline nor the submitting directory enters it."""
    key = fingerprint(label, resolved_work(config), inputs)
    return f"omni-{label}-{key[:12]}"


# ------------------------------------------------------------------ submit, attach, wait


@dataclass
class Submission:
    """The job a ``submit`` call started or attached to."""

    submission_id: str
    attached: bool
    status: str


def _jobs_of(client: JobSubmissionClient, base: str) -> list[JobDetails]:
    pattern = re.compile(rf"^{re.escape(base)}(-r\d+)?$")
    jobs = [j for j in client.list_jobs() if j.submission_id and pattern.match(j.submission_id)]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def submit(
    client: JobSubmissionClient,
    config: PipelineConfig,
    stage: str,
    base: str,
    start: str | None = None,
) -> Submission:
    """Attach to a pending, running or succeeded job of this work, or start one
    (``stage`` ``run`` with ``start``: the workflow from that stage on)."""
    jobs = _jobs_of(client, base)
    if jobs and str(jobs[-1].status) in ACTIVE:
        latest = jobs[-1]
        return Submission(latest.submission_id, True, str(latest.status))
    submission_id = f"{base}-r{len(jobs)}" if jobs else base
    entrypoint = f"python -m pipelines.workflow.submit {stage}"
    if start:
        entrypoint += f" --from {start}"
    client.submit_job(
        entrypoint=entrypoint,
        submission_id=submission_id,
        runtime_env=runtime_env(config, stage, submission_id),
        metadata={"omni.stage": stage, "omni.workspace": absolute(config.workspace)},
        entrypoint_num_cpus=config.submit.entrypoint_num_cpus or None,
        entrypoint_num_gpus=config.submit.entrypoint_num_gpus or None,
    )
    return Submission(submission_id, False, "PENDING")


def follow(
    client: JobSubmissionClient, submission_id: str, write: Callable[[str], Any] = sys.stdout.write
) -> None:
    """Stream the job's logs until it ends (Ctrl-C raises KeyboardInterrupt: the job goes on)."""

    async def stream() -> None:
        async for lines in client.tail_job_logs(submission_id):
            write(lines)

    # Ctrl-C must detach even if this process inherited SIGINT blocked or ignored (Ray
    # starts its processes with SIGINT blocked) or an import replaced the handler: asyncio
    # only turns SIGINT into KeyboardInterrupt over the default handler.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        asyncio.run(stream())
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def failure_reason(client: JobSubmissionClient, submission_id: str) -> str:
    """The one-line reason of a failed job: the last ``error:`` line its driver printed."""
    logs = client.get_job_logs(submission_id)
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ").strip()
    message = client.get_job_info(submission_id).message or "no reason given"
    return message.strip().splitlines()[0]


# ------------------------------------------------------------------ inside the job


def job_main(argv: list[str]) -> int:
    """The job's entrypoint: ``STAGE`` or ``run [--from STAGE]``, with the shipped config."""
    from pipelines.config import PipelineConfig
    from pipelines.workflow.summary import execute

    stage, *rest = argv
    start = rest[1] if rest[:1] == ["--from"] and len(rest) == 2 else None
    if rest and start is None:
        raise SystemExit(f"usage: STAGE | run [--from STAGE]; got {' '.join(argv)}")
    data = json.loads(os.environ[CONFIG_ENV])
    data["ray"]["address"] = "auto"  # the cluster this job runs on
    config = validate(PipelineConfig, data, source="submitted config")
    submitted_from = os.environ.get(CWD_ENV, "")
    if submitted_from and Path(submitted_from).is_dir():
        os.chdir(submitted_from)
    print(f"omni job {stage}: working in {os.getcwd()}", flush=True)
    return execute(config, start=start, only=None if stage == "run" else stage)


if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1:]))
