"""Rank 0's MLflow writer: metrics by step, exactly once across resumes, and tags.

MLflow cannot delete a metric point and keeps a re-logged step as a second point, so a
resumed run must not log a step again: steps up to the last one in the run's ``train/loss``
history when the log opens are skipped. A run resumed from a checkpoint recomputes the steps
after it bit for bit, so skipping them loses nothing. Metrics go out asynchronously
(MLflow's own ``synchronous=False`` queue) so logging never stalls a step; ``flush``
waits for them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor


def last_logged_step(client: MlflowClient, run_id: str) -> int:
    """The last step of the run's ``train/loss`` history (0 when there is none)."""
    history = client.get_metric_history(run_id, "train/loss")
    return max((m.step for m in history), default=0)


class StepLog:
    """Metrics and tags of one MLflow run, written from one process."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id, self.last_logged = run_id, last_logged_step(self.client, run_id)
        self._pending: list[Any] = []
        # MLflow's own sampler of CPU, memory, disk, network and GPU use (system/* metrics).
        resumed = self.last_logged > 0
        self.system = SystemMetricsMonitor(
            run_id, sampling_interval=10, resume_logging=resumed, tracking_uri=tracking_uri
        )
        self.system.start()

    def log(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Log ``metrics`` at ``step`` unless that step was logged before; True if logged."""
        if step <= self.last_logged:
            return False
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow's batch limit
            self._pending.append(
                self.client.log_batch(
                    self.run_id, metrics=batch[start : start + 1000], synchronous=False
                )
            )
        self.last_logged = step
        return True

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def delete_tag(self, key: str) -> None:
        """Remove ``key``; one that was never set is not an error (a run killed between a
        checkpoint's marker and its tag prunes that checkpoint after the resume)."""
        try:
            self.client.delete_tag(self.run_id, key)
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise

    def close(self) -> None:
        """Flush the metrics and stop the system-metrics sampler."""
        self.flush()
        self.system.finish()

    def flush(self) -> None:
        """Wait until every queued metric is stored; re-raise a failed write."""
        pending, self._pending = self._pending, []
        for future in pending:
            if future is not None:
                future.wait()
