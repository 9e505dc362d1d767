"""MLflow tracking against a real `mlflow server` on 127.0.0.1: a parent run per pipeline
run, one child per job with its step metrics, the final numbers and the report."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from raycluster import free_port

from branchout.orchestrator.run.state import RunRecord

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    yield uri
    server.terminate()
    server.wait(30)


def test_parent_run_children_per_job_metrics_and_report(mlflow_uri, write_pipeline, tmp_path):
    from mlflow.tracking import MlflowClient

    spec = copy.deepcopy(TINY)
    spec["tracking"] = {"mlflow_uri": mlflow_uri, "experiment": "tracking-test"}
    out = run_cli("run", str(write_pipeline(spec)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "MLflow tracking" not in out.stdout  # no tracking failure was reported

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("tracking-test")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    run_id = parent.data.tags["branchout.run_id"]
    record = RunRecord.load(str(next((tmp_path / "runs" / "tiny").iterdir())))
    assert record.run_id == run_id and record.tracking["run_id"] == parent.info.run_id  # kept for resume
    children = {r.data.tags["branchout.job"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    jobs = {"tokenizer", "data/pretrain", "pretrain", *(f"{k}/{d}" for k in ("data", "finetune", "scratch", "evaluate")
                                                       for d in ("legal", "code", "docs"))}
    assert set(children) == jobs
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert parent.info.status == "FINISHED" and parent.data.params["pretrain.steps"] == "12"

    steps = [m.step for m in client.get_metric_history(children["pretrain"].info.run_id, "loss")]
    assert steps == sorted(steps) and steps[-1] == 12 and len(steps) >= 6  # logged live, every log_every
    assert len(client.get_metric_history(children["finetune/code"].info.run_id, "loss")) >= 4
    assert children["evaluate/legal"].data.metrics["base_ppl"] > 1
    assert children["pretrain"].data.metrics["final_loss"] > 0
    assert parent.data.metrics["legal.finetuned_ppl"] > 1 and "legal.transfer_gain" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.html"} <= artifacts
    assert run_id in out.stdout
