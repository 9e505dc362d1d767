"""A preemption notice costs no steps (issue 31), whether it comes as a SIGTERM to the training
worker's process or as a node drain: one pretrain meets both, at steps it holds at.

A SIGTERM is what a node agent relaying a spot notice, or a container runtime, sends the
process; the worker's setup hook (stages/training/sigterm.py) turns it into a checkpoint.
On a cloud cluster a spot node's reclaim reaches Ray as a *drain* of the node with a deadline:
the autoscaler sends it on the cloud's notice, and on Kubernetes the pod's preStop hook sends
it when the pod is deleted (deploy/). Here a real two-worker-node Ray cluster gets the same
drain from that hook itself (`python -m branchout.cluster.drain`, which runs `ray drain-node
--reason DRAIN_NODE_REASON_PREEMPTION`) while a pretrain runs on one of its nodes. The job must checkpoint the step it is at, end that Ray Train run, start again on
the node that remains and resume from exactly that step: every step trained once. The only
periodic checkpoint is the last step's, so nothing else could have been resumed from.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
from raycluster import LocalRayCluster

from conftest import job_parts

STEPS = 60
HOLD = 20  # BRANCHOUT_FAULTS=pretrain@20:hold: after step 20 the job waits for a notice (a SIGTERM)
HOLD_AGAIN = 40  # and after step 40 (a node drain)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # no CPU on the head: the training worker lands on one of two 1-CPU worker nodes, and the
    # other is where it can go once that one is drained. Ray Train's drain watcher polls every
    # 5 s by default; 0.5 s keeps the test short (the notice gives minutes on real clouds). The
    # planned hold makes the notice land at an exact step, whatever the machine's speed.
    c = LocalRayCluster(tmp_path_factory.mktemp("preempt"), head_cpus=0, worker_cpus=1, worker_nodes=2,
                        extra_env={"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
                                   "BRANCHOUT_FAULTS": f"pretrain@{HOLD}:hold,pretrain@{HOLD_AGAIN}:hold"}).start()
    yield c
    c.stop()


def _job(root, data_uri, overrides):
    from branchout.core.spec import PretrainSpec
    from branchout.stages.job import TrainJob

    t = PretrainSpec(dataset={"path": "unused"}, steps=STEPS, seq_len=32, global_batch_size=4, micro_batch_size=4,
                     num_workers=1, resources_per_worker={"cpu": 1}, checkpoint_every=STEPS, log_every=1,
                     optimizer={"lr": 3e-3}, schedule={"warmup_steps": 2}, deepspeed={"precision": "fp32"})
    return TrainJob(name="pretrain", kind="pretrain", training=t, steps=STEPS, model_type="llama",
                    model_overrides=overrides, tokenizer_uri=str(root / "tokenizer"), data_uri=data_uri,
                    out_uri=str(root / "pretrain"), logs_uri=str(root / "logs"), run_id="test")


def _train_workers(cluster) -> list[dict]:
    out = subprocess.run(["ray", "list", "actors", "--address", cluster.address, "-f", "class_name=RayTrainWorker",
                          "--format", "json"], env=cluster.env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _logged_steps(root) -> list[int]:
    path = root / "logs" / "pretrain.metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


def _wait_for_step(root, driver, step: int) -> None:
    deadline = time.time() + 240
    while max(_logged_steps(root), default=0) < step:
        if driver.poll() is not None or time.time() > deadline:
            driver.kill()
            raise AssertionError(f"the pretrain did not reach step {step}: {driver.communicate()[1][-3000:]}")
        time.sleep(0.5)


def _alive_worker(cluster) -> dict:
    deadline = time.time() + 120
    while not (alive := [w for w in _train_workers(cluster) if w["state"] == "ALIVE"]):
        assert time.time() < deadline, "no training worker came up"
        time.sleep(0.5)
    [worker] = alive
    return worker


def test_a_sigterm_then_a_drained_node_cost_no_steps_the_job_goes_on_elsewhere(cluster, corpus_dir, tmp_path):
    root, data_uri, overrides = job_parts(tmp_path, corpus_dir)
    job = _job(root, data_uri, overrides)
    with open(tmp_path / "job.pkl", "wb") as f:
        pickle.dump(job, f)
    # the driver's side, as the pipeline driver runs it: connected to the cluster, waiting on the job
    script = ("import json, pickle, sys, ray; ray.init(address=sys.argv[2]); "
              "from branchout.orchestrator.run.ray_train import run_distributed; "
              "print('RESULT', json.dumps(run_distributed(pickle.load(open(sys.argv[1], 'rb')))))")
    driver = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "job.pkl"), f"127.0.0.1:{cluster.gcs_port}"],
                              env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # 1. SIGTERM to the training worker's process, what a node agent relaying a spot notice sends
        _wait_for_step(root, driver, HOLD)
        first = _alive_worker(cluster)
        os.kill(first["pid"], signal.SIGTERM)
        # 2. the next run holds again; the deploy manifests' preStop hook drains its node and
        # returns once no training worker is left there (the pod may then go)
        _wait_for_step(root, driver, HOLD_AGAIN)
        worker = _alive_worker(cluster)
        assert worker["actor_id"] != first["actor_id"]
        hook = subprocess.run([sys.executable, "-m", "branchout.cluster.drain", "--address",
                               f"127.0.0.1:{cluster.gcs_port}", "--node-id", worker["node_id"], "--grace", "120",
                               "--poll", "0.5"], env=cluster.env(), capture_output=True, text=True, timeout=180)
        assert hook.returncode == 0, hook.stderr[-2000:]
        assert f"node {worker['node_id'][:12]} drained; 0 training worker(s) left after" in hook.stdout
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.split("RESULT ", 1)[1])
    notices = [int(line.split("preempted at step ")[1].split()[0]) for line in stdout.splitlines()
               if "preempted at step" in line]
    # each the first step the loop finished after its notice (it asks on every logged step);
    # its checkpoint is the notice's own: the only periodic one is the last step's
    assert notices == [HOLD + 1, HOLD_AGAIN + 1], stdout[-2000:]
    assert result["preemptions"] == 2 and result["steps"] == STEPS
    assert result["first_step"] == HOLD_AGAIN + 1  # the last run resumed from exactly the step checkpointed
    assert _logged_steps(root) == list(range(1, STEPS + 1))  # every step trained and logged once: none redone
    # the last run's worker was placed on the node that was not drained
    [last] = [w for w in _train_workers(cluster) if w["actor_id"] not in (first["actor_id"], worker["actor_id"])]
    assert last["node_id"] != worker["node_id"]
