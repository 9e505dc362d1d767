"""One way for every stage to report: a JSONL file, TensorBoard events, live progress.

Only rank 0 of a job logs. The JSONL file (``logs/<job>.metrics.jsonl``) is what the
report's loss curves are drawn from; TensorBoard events go to ``logs/tensorboard/<job>``.
For remote storage both are written locally and uploaded when the logger closes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from branchout import storage
from branchout.core.progress import connect_hub


class MetricsLogger:
    def __init__(self, job: str, logs_uri: str, hub: str | None, total_steps: int,
                 tracking: dict[str, str] | None = None):
        self.job = job
        self.slug = job.replace("/", "-")
        self.total_steps = total_steps
        self.logs_uri = logs_uri
        self._local = storage.local_path(logs_uri) if storage.is_local(logs_uri) else tempfile.mkdtemp()
        os.makedirs(self._local, exist_ok=True)
        # kept open for the job's life; appended so a retried attempt adds to the history
        self._jsonl = open(os.path.join(self._local, f"{self.slug}.metrics.jsonl"), "a")  # noqa: SIM115
        self._tb = None
        self._hub = connect_hub(hub)
        self.warnings: list[str] = []
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self._local, "tensorboard", self.slug))
        except Exception as e:  # tensorboard is a dependency; a broken install still trains, and says so
            self.warn(f"TensorBoard events off: {type(e).__name__}: {e}")
        self._mlflow = _MlflowSink(tracking, self.warn) if tracking else None

    def warn(self, text: str) -> None:
        """Something the user should know that does not stop the job: printed here, and sent
        to the driver, which says it on the terminal and keeps it in the job's record (a
        worker's own output is not forwarded everywhere)."""
        print(f"[branchout] {self.job}: {text}", flush=True)
        self.warnings.append(text)
        self._push({"warnings": list(self.warnings)})

    def state(self, state: str, **fields: Any) -> None:
        """Tell the driver the job's state (``running``, ``succeeded``, ...)."""
        self._push({"state": state, **fields})

    def log(self, step: int, **metrics: float) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"{self.job}/{key}", value, step)
        self._push({"step": step, "total_steps": self.total_steps, **metrics})
        if self._mlflow is not None:
            self._mlflow.log(step, record["time"], metrics)

    def _push(self, fields: dict[str, Any]) -> None:
        if self._hub is not None:
            self._hub.update.remote(self.job, fields)  # fire and forget

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if not storage.is_local(self.logs_uri):
            storage.upload_dir(self._local, self.logs_uri)


class _MlflowSink:
    """Step metrics into the job's MLflow child run (``orchestrator.run.tracking`` made it), live.
    A server that fails costs its records, never the job: the first failure is said (the
    logger's ``warn``: the driver shows it and keeps it) and the sink goes quiet."""

    def __init__(self, tracking: dict[str, str], warn):
        self.run_id = tracking["run_id"]
        self._client = None
        self._uri = tracking["uri"]
        self._warn = warn

    def log(self, step: int, when: float, metrics: dict[str, float]) -> None:
        if self._uri is None:
            return
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            self._client = self._client or MlflowClient(tracking_uri=self._uri)
            self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), int(when * 1000), step)
                                                         for k, v in metrics.items()])
        except Exception as e:  # tracking is a record of the job, never a reason to stop it
            self._warn(f"MLflow tracking at {self._uri} stopped: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            self._uri = None


def read_metrics(logs_uri: str, job: str) -> list[dict[str, Any]]:
    uri = storage.join(logs_uri, f"{job.replace('/', '-')}.metrics.jsonl")
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]
