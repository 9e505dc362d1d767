"""On Ray's fake multi-node autoscaler: nodes come ahead of the fan-out and go after the run.

The pipeline's stages ask for (fake) GPUs; only the autoscaler can provide them. The test
samples the cluster's GPU node count every half second and checks, against the registry's
record of capacity hints and the run's job times, that
  - GPU nodes were requested before any fan-out job was submitted,
  - the fan-out's width (3 concurrent GPU jobs) was reached,
  - the GPU nodes were released after the run (scale-down).
"""

from __future__ import annotations

import copy
import time

import pytest

from branchout.cluster.fake import FakeAutoscalingCluster
from branchout.orchestrator.operate.registry import Registry
from branchout.orchestrator.run.state import RunRecord, RunState

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def fake_cluster(tmp_path):
    cluster = FakeAutoscalingCluster(tmp_path, gpu_nodes=4, idle_timeout_minutes=0.1).start()
    yield cluster
    cluster.stop()


def test_nodes_arrive_ahead_of_the_fanout_and_leave_after(fake_cluster, write_pipeline, tmp_path):
    spec = copy.deepcopy(TINY)
    spec["storage"] = f"file://{tmp_path / 'runs'}"  # several nodes: storage must be shared
    spec["cluster"] = {"autoscaling": True, "capacity_timeout_s": 30}
    spec["pretrain"].update(resources_per_worker={"cpu": 0.5, "gpu": 1}, steps=40, checkpoint_every=10)
    spec["finetune"]["defaults"].update(resources_per_worker={"cpu": 0.5, "gpu": 1}, steps=30)
    spec["evaluate"]["models"] = ["base", "finetuned"]  # 3 fan-out jobs, one GPU node each
    out = run_cli("run", str(write_pipeline(spec)), env=fake_cluster.env(), timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "capacity hint: pretrain in its last interval; fan-out ahead" in out.stdout

    record = RunRecord.load(str(next((tmp_path / "runs" / "tiny").iterdir())))
    assert record.state is RunState.SUCCEEDED
    events = {e["reason"]: e["time"] for e in Registry().events_for(record.run_id)}
    fanout_queued = min(record.job(f"finetune/{d}").queued for d in ("legal", "code", "docs"))
    assert events["pretrain in its last interval; fan-out ahead"] < record.job("pretrain").ended < fanout_queued
    assert events["run ended"] >= record.job("evaluate/docs").ended - 1

    peak = max(n for _, n in fake_cluster.samples)
    assert peak >= 3, fake_cluster.samples  # the fan-out's width was reached
    # nodes for the fan-out were being added before it was submitted
    before = [n for t, n in fake_cluster.samples if t < fanout_queued]
    assert max(before) >= 3, fake_cluster.samples

    deadline = time.time() + 120  # idle_timeout 6 s + the autoscaler's rounds
    while fake_cluster.gpu_nodes() > 0 and time.time() < deadline:
        time.sleep(1)
    assert fake_cluster.gpu_nodes() == 0, fake_cluster.samples[-10:]
