"""MLflow: the ``mlflow`` config section and a small tracker over ``MlflowClient``.

``tracking_uri: null`` keeps a local SQLite store (and an artifact folder) inside a local
workspace, so a laptop run needs no server; a cluster run points at ``http://HOST:5000``.
Params are the flattened stage config with secrets and URI credentials masked.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from infra.config import Section, public_dict, redact_uri
from infra.storage import is_remote

# Never write ~/.config/mlflow/telemetry.json from library code.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A progress bar per artifact download would break the one-line errors and summaries.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

MAX_PARAM_LENGTH = 6000  # MLflow's limit for one param value


class MlflowConfig(Section):
    """Where runs are tracked. ``tracking_uri: null`` keeps a local store in the workspace."""

    tracking_uri: str | None = Field(None, description="http://HOST:5000, sqlite:///..., null")
    experiment: str = Field("omni", min_length=1)


def local_store(workspace: str) -> tuple[str, str]:
    """(tracking URI, artifact location) of the default store under a local workspace."""
    if is_remote(workspace):
        raise ValueError(
            f"mlflow.tracking_uri must be set when the workspace is remote ({workspace}): "
            "a local SQLite store needs a local workspace"
        )
    root = Path(workspace).absolute() / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def seed_local_store(database: Path) -> None:
    """Create a missing local store as a copy of an empty, migrated one.

    MLflow builds a new SQLite store by running its Alembic migrations (68 in MLflow 3.17:
    about 4 s of CPU on every first command in a workspace, and in every test workspace);
    it offers no template, so one is built once per MLflow version under the user's cache
    folder and copied. The template holds no experiment: MLflow adds its ``Default``
    experiment (whose artifact location is the store's own) when it first opens the copy.
    Any failure leaves the store to MLflow, as before."""
    if database.exists():
        return
    try:
        template = _empty_store_template()
        partial = database.with_name(f".{database.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, partial)
        try:
            os.link(partial, database)  # never over a store another process just made
        except FileExistsError:
            pass
        finally:
            partial.unlink()
    except (OSError, sqlite3.Error):
        return


def _empty_store_template() -> Path:
    """The migrated, experiment-free SQLite store of this MLflow version (built once)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omni"
    template = cache / f"mlflow-{importlib.metadata.version('mlflow')}-empty.db"
    if template.is_file():
        return template
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = Path(scratch) / "mlflow.db"
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore(f"sqlite:///{built}", Path(scratch).as_uri())
        store.engine.dispose()
        with closing(sqlite3.connect(built)) as connection, connection:
            connection.execute("DELETE FROM experiments WHERE experiment_id = 0")
        os.replace(built, template)  # atomic: concurrent builders each publish a whole file
    return template


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, values cut to MLflow's param limit."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


class Tracker:
    """One MLflow run: params once, metrics by step, artifacts; safe to log from one process."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, config: BaseModel | Mapping[str, Any], prefix: str = "") -> None:
        """Log a config as flattened params, secrets masked."""
        data = public_dict(config) if isinstance(config, BaseModel) else dict(config)
        params = flatten(data, prefix)
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_bytes(self, data: bytes, name: str, folder: str | None = None) -> None:
        """Log in-memory content (a PNG, a JSON report) as an artifact called ``name``."""
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / name
            path.write_bytes(data)
            self.log_artifact(path, folder)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)


def tracking_uri(config: MlflowConfig, workspace: str) -> str:
    """The tracking URI runs of this pipeline use (the local store when none is set)."""
    return config.tracking_uri or local_store(workspace)[0]


def open_experiment(config: MlflowConfig, workspace: str) -> tuple[Any, str]:
    """An ``MlflowClient`` and the id of ``config.experiment``, created if missing."""
    from mlflow import MlflowClient

    if config.tracking_uri:
        uri, artifacts = config.tracking_uri, None
    else:
        uri, artifacts = local_store(workspace)
        seed_local_store(Path(uri.removeprefix("sqlite:///")))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is None:
        return client, client.create_experiment(config.experiment, artifact_location=artifacts)
    return client, experiment.experiment_id


@contextmanager
def tracked_run(
    config: MlflowConfig, workspace: str, run_name: str, tags: Mapping[str, str] | None = None
) -> Iterator[Tracker]:
    """Start a run in ``config.experiment``; it ends FINISHED, or FAILED on an exception."""
    client, experiment_id = open_experiment(config, workspace)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
    tracker = Tracker(client, run.info.run_id)
    try:
        yield tracker
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


def describe(config: MlflowConfig, workspace: str) -> str:
    """Where runs go, for summaries (credentials masked)."""
    return redact_uri(config.tracking_uri) if config.tracking_uri else local_store(workspace)[0]
