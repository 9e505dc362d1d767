"""Submit, watch, stop and resume pipelines on a real `ray start` cluster (head + worker node).

Ray's own CLI (`ray job list`, `ray job logs`) is the referee for what branchout reports.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from raycluster import TOKEN_VARIABLES, LocalRayCluster

from branchout.orchestrator.run.state import RunRecord, RunState

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalRayCluster(tmp_path_factory.mktemp("raycluster")).start()
    yield c
    c.stop()


def pipeline_file(corpus_dir, tmp_path, **changes) -> str:
    spec = yaml.safe_load(yaml.safe_dump(TINY))
    spec["storage"] = f"file://{tmp_path / 'runs'}"  # two nodes: storage must be declared shared
    spec["pretrain"]["dataset"]["path"] = str(corpus_dir / "general.jsonl")
    for d in spec["finetune"]["domains"]:
        d["dataset"]["path"] = str(corpus_dir / d["dataset"]["path"])
    spec["evaluate"]["models"] = ["base", "finetuned"]
    for key, value in changes.items():
        section, _, field = key.partition("__")
        spec[section][field] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def cli(cluster, *args, token=True, timeout=600):
    return run_cli(*args, env=cluster.env(with_token=token), unset=() if token else TOKEN_VARIABLES, timeout=timeout)


def submitted_run_id(out) -> str:
    line = next(x for x in out.stdout.splitlines() if x.startswith("submitted run "))
    return line.split()[2]


def wait_for(predicate, timeout=300, interval=1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def test_request_without_token_is_refused_in_one_line(cluster, corpus_dir, tmp_path):
    out = cli(cluster, "submit", pipeline_file(corpus_dir, tmp_path), "--address", cluster.address, token=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: the Ray cluster at {cluster.address} requires an authentication token: set RAY_AUTH_TOKEN, "
        "or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in ~/.ray/auth_token"]
    assert cluster.token not in out.stdout + out.stderr


def test_unreachable_address(cluster, corpus_dir, tmp_path):
    out = cli(cluster, "submit", pipeline_file(corpus_dir, tmp_path), "--address", "http://127.0.0.1:9")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Ray Jobs API at http://127.0.0.1:9")


def test_stop_then_resume_continues_from_checkpoints(cluster, corpus_dir, tmp_path):
    path = pipeline_file(corpus_dir, tmp_path)
    out = cli(cluster, "submit", path, "--address", cluster.address,
              "--set", "pretrain.steps=240", "--set", "pretrain.checkpoint_every=20")
    assert out.returncode == 0, out.stderr
    run_id = submitted_run_id(out)
    run_dir = f"{tmp_path}/runs/tiny/{run_id}"

    def checkpointed():  # the pretrain has reported at least one checkpoint
        metrics = list((tmp_path / "runs" / "tiny" / run_id / "logs").glob("pretrain.metrics.jsonl"))
        if not metrics:
            return False
        steps = [json.loads(x)["step"] for x in metrics[0].read_text().splitlines()]
        return max(steps, default=0) >= 60

    wait_for(checkpointed, timeout=300)
    stopped = cli(cluster, "stop", run_id)
    assert stopped.returncode == 0, stopped.stderr
    assert RunRecord.load(run_dir).state is RunState.STOPPED
    assert cluster.job_state(run_id) == "STOPPED"

    # an edited pipeline file is refused unless --force; the edit is the one a user makes
    # when nodes are gone: the pretrain goes on with fewer workers (its ZeRO-2 checkpoint is
    # resharded: tests/integration/test_reshard.py checks the losses)
    edited = yaml.safe_load(Path(path).read_text())
    edited["description"] = "edited"
    assert edited["pretrain"]["num_workers"] == 2
    edited["pretrain"]["num_workers"] = 1
    with open(path, "w") as f:
        yaml.safe_dump(edited, f)
    refused = cli(cluster, "resume", run_id)
    assert refused.returncode == 2 and "changed since run" in refused.stderr and "--force" in refused.stderr

    resumed = cli(cluster, "resume", run_id, "--force")
    assert resumed.returncode == 0, resumed.stderr
    wait_for(lambda: RunRecord.load(run_dir).state is not RunState.STOPPED, timeout=120, interval=0.5)
    wait_for(lambda: RunRecord.load(run_dir).state.is_terminal(), timeout=400, interval=2)
    record = RunRecord.load(run_dir)
    assert record.state is RunState.SUCCEEDED, record.error
    resumed_from = record.job("pretrain").outputs["resumed_from"]
    assert resumed_from >= 20 and resumed_from % 20 == 0  # from a reported checkpoint, not step 0
    assert record.job("pretrain").outputs["workers"] == 1
    warnings = record.job("pretrain").outputs.get("warnings", [])  # said on the terminal, kept with the job
    assert any("was written by 2 worker(s); resharding it for 1" in w for w in warnings), warnings
    assert record.job("tokenizer").attempts == 1  # finished jobs are never redone
    # the driver records the end of the run a moment before its Ray job exits
    wait_for(lambda: f"Ray job {run_id}-r1 (SUCCEEDED)" in cli(cluster, "status", run_id).stdout, timeout=60)


def test_local_storage_refused_on_a_multi_node_cluster(cluster, corpus_dir, tmp_path):
    path = pipeline_file(corpus_dir, tmp_path)
    spec = yaml.safe_load(Path(path).read_text())
    spec["storage"] = str(tmp_path / "plain")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    out = cli(cluster, "submit", path, "--address", cluster.address, "--wait")
    assert "is a local directory but the cluster has 2 nodes" in out.stdout + out.stderr
    run_id = submitted_run_id(out)
    # the driver failed before it wrote anything: branchout and Ray agree, and say why
    assert cluster.job_state(run_id) == "FAILED"
    status = cli(cluster, "status", run_id)
    assert "state failed" in status.stdout and "is a local directory but the cluster has 2 nodes" in status.stdout
    listed = cli(cluster, "list", "--pipeline", "tiny", "--state", "failed")
    assert run_id in listed.stdout
