"""Submit and watch pipelines on a real `ray start` cluster (head + worker node); stopping,
resuming and a lost head are tests/e2e/test_head_loss.py.

Ray's own CLI (`ray job list`, `ray job logs`) is the referee for what branchout reports.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from raycluster import TOKEN_VARIABLES, LocalRayCluster

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
