"""Experiment tracking in MLflow: one parent run per pipeline run, a child run per job.

With ``tracking: {mlflow_uri: http://mlflow:5000, experiment: legal-assistant}`` the driver
opens (or, on resume, reopens) a parent run named after the pipeline run and logs the
resolved spec as parameters. Each job gets a child run when it is first submitted; its id
travels to the worker in ``TrainJob.tracking``, and the worker logs every step's metrics
there itself (``stages.training.metrics``), so curves are live while a job trains. When a job ends
the driver logs its outputs (final loss, throughput, perplexities) and closes the child;
when the run ends it logs the evaluation table as parent metrics and the report as
artifacts. The ids are kept in ``state.json`` (``RunRecord.tracking``).

TensorBoard event files (``logs/tensorboard``) are written either way. A tracking server
that fails mid-run costs its records, never the run: every call here is guarded and the
first failure is reported once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

from branchout.orchestrator.run.state import JobRecord, RunRecord, RunState

MAX_PARAM = 500  # MLflow caps a parameter value's length; a long list is cut, not refused


class Tracker:
    """The driver's side of MLflow tracking; a no-op when the spec names no server."""

    def __init__(self, spec, record: RunRecord, warn: Callable[[str], None]):
        self.uri = spec.tracking.mlflow_uri
        self.record = record
        self._warn = warn
        self._failed = False
        self._client = None
        if self.uri:
            self._guard(lambda: self._open_parent(spec))

    @property
    def enabled(self) -> bool:
        return self._client is not None and not self._failed

    def child(self, job: str) -> dict[str, str] | None:
        """The child run of ``job`` (created at its first attempt), as workers receive it."""
        if not self.enabled:
            return None
        ids = self.record.tracking.setdefault("children", {})
        if job not in ids:
            run = self._guard(lambda: self._client.create_run(
                self.record.tracking["experiment_id"], run_name=job,
                tags={"mlflow.parentRunId": self.record.tracking["run_id"], "branchout.job": job,
                      "branchout.run_id": self.record.run_id}))
            if run is None:
                return None
            ids[job] = run.info.run_id
            self.record.save()
        return {"uri": self.uri, "run_id": ids[job]}

    def job_ended(self, job: str, rec: JobRecord) -> None:
        """Final numbers of a job into its child run, which is then closed. A cached job
        gets a child too, holding the numbers it reused."""
        if not self.enabled:
            return
        run_id = (self.record.tracking.get("children") or {}).get(job)
        if run_id is None:
            child = self.child(job) if rec.state.done else None
            if child is None:
                return
            run_id = child["run_id"]
        numbers = {k: float(v) for k, v in rec.outputs.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("pid", "started", "ended")}
        status = "FINISHED" if rec.state.done else "FAILED"

        def close() -> None:
            self._log(run_id, numbers)
            self._client.set_tag(run_id, "branchout.state", rec.state.value)
            self._client.set_terminated(run_id, status)

        self._guard(close)

    def finish(self, metrics: dict | None, report_dir: str | None) -> None:
        """The evaluation table as parent metrics, the report as artifacts, the parent closed."""
        if not self.enabled:
            return
        parent = self.record.tracking["run_id"]
        rows = (metrics or {}).get("domains", {})
        # a nested score (exact_match, rouge_l: model → value) becomes <domain>.<metric>.<model>
        flat = {f"{domain}.{k}": v for domain, row in rows.items() for k, v in _flatten(row).items()}
        numbers = {k: float(v) for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        status = {RunState.SUCCEEDED: "FINISHED", RunState.STOPPED: "KILLED"}.get(self.record.state, "FAILED")

        def close() -> None:
            self._log(parent, numbers)
            if report_dir:
                for name in ("report.md", "report.html", "eval/metrics.json"):
                    _log_artifact(self._client, parent, report_dir, name)
            self._client.set_terminated(parent, status)

        self._guard(close)

    # ---- internals --------------------------------------------------------------------

    def _open_parent(self, spec) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        name = spec.tracking.experiment or spec.name
        experiment = self._client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(name)
        if self.record.tracking.get("run_id"):  # a resumed run continues its parent
            self._client.update_run(self.record.tracking["run_id"], status="RUNNING")
            return
        run = self._client.create_run(experiment_id, run_name=self.record.run_id,
                                      tags={"branchout.run_id": self.record.run_id, "branchout.pipeline": spec.name})
        self.record.tracking.update(run_id=run.info.run_id, experiment_id=experiment_id, uri=self.uri)
        self.record.save()
        params = _flatten(spec.model_dump(mode="json", exclude={"tracking"}))
        self._client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in params.items()])

    def _log(self, run_id: str, numbers: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in numbers.items()]
        for i in range(0, len(metrics), 500):  # MLflow's batch limit is 1,000 metrics
            self._client.log_batch(run_id, metrics=metrics[i:i + 500])

    def _guard(self, call: Callable[[], Any]) -> Any:
        if self._failed:
            return None
        try:
            return call()
        except Exception as e:  # tracking is a record of the run, never a reason to stop it
            self._failed = True
            self._warn(f"MLflow tracking at {self.uri} stopped: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return None


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(_flatten(item, f"{prefix}{key}.{item.get('name', i)}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _param(key: str, value: Any):
    from mlflow.entities import Param

    text = str(value)
    return Param(key, text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 1] + "…")


def _log_artifact(client, run_id: str, run_uri: str, name: str) -> None:
    from branchout import storage

    uri = storage.join(run_uri, name)
    if not storage.exists(uri):
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(name))
        with open(local, "wb") as f:
            f.write(storage.read_bytes(uri))
        client.log_artifact(run_id, local, artifact_path=os.path.dirname(name) or None)
