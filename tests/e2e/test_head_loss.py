"""A submitted run's whole life on a real `ray start` cluster (head + worker node), through
the two interruptions a cluster's users meet (issue 31):

1. **the head node dies** mid-pretrain (every process of the cluster SIGKILLed, drivers and
   Ray Train workers included) and a new head comes up at the same address, as KubeRay
   brings one back behind its service. Nobody types anything: a `branchout recover --watch`
   process (what deploy/kuberay/recover-cronjob.yaml runs) finds the run whose cluster no
   longer knows its Ray job and resumes it there, from the pretrain's last checkpoint;
2. **a person stops it**, edits the pipeline to go on with fewer pretrain workers, is
   refused until `--force`, and resumes: the pretrain's ZeRO-2 checkpoint of 2 workers is
   resharded for 1 (tests/integration/test_reshard.py checks the losses) and the run ends.

The watcher leaves the stopped run alone: only lost drivers are recovered.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from raycluster import LocalRayCluster

from branchout.orchestrator.run.state import RunRecord, RunState

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    c = LocalRayCluster(tmp_path / "cluster")
    c.workdir.mkdir()
    yield c.start()
    c.stop()


def _pipeline(corpus_dir, tmp_path) -> Path:
    spec = yaml.safe_load(yaml.safe_dump(TINY))
    spec["storage"] = f"file://{tmp_path / 'runs'}"  # two nodes: storage must be declared shared
    spec["pretrain"]["dataset"]["path"] = str(corpus_dir / "general.jsonl")
    # long enough that a stop lands mid-pretrain: a step of this model takes milliseconds
    spec["pretrain"].update(steps=600, checkpoint_every=20)
    spec["finetune"]["domains"] = [{**spec["finetune"]["domains"][0],
                                    "dataset": {"path": str(corpus_dir / "legal.jsonl")}}]
    spec["evaluate"]["models"] = ["base", "finetuned"]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _logged_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "logs" / "pretrain.metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.strip()]


def test_a_run_survives_its_head_unattended_then_a_stop_and_resumes_on_fewer_workers(cluster, corpus_dir,
                                                                                      tmp_path):
    env = cluster.env()

    def cli(*args):
        return run_cli(*args, env=env)

    watcher = subprocess.Popen([sys.executable, "-m", "branchout", "recover", "--watch", "1"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        path = _pipeline(corpus_dir, tmp_path)
        out = cli("submit", str(path), "--address", cluster.address)
        assert out.returncode == 0, out.stderr
        run_id = next(x for x in out.stdout.splitlines() if x.startswith("submitted run ")).split()[2]
        run_dir = tmp_path / "runs" / "tiny" / run_id

        # 1. the head is lost after the step-40 checkpoint; a new one comes up at the same address
        _wait_for(lambda: max(_logged_steps(run_dir), default=0) >= 40, 300, "pretrain step 40")
        cluster.stop()
        lost_at = max(_logged_steps(run_dir))
        assert RunRecord.load(str(run_dir)).state is RunState.RUNNING  # nobody recorded anything: it crashed
        cluster.start()
        def restarted():  # the log's steps go back: a new attempt began from a checkpoint
            steps = _logged_steps(run_dir)
            return next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)

        restart = _wait_for(restarted, 300, "the recovered pretrain's first logged step")
        steps = _logged_steps(run_dir)
        assert steps[restart - 1] == lost_at
        checkpoint = steps[restart] - 1
        assert checkpoint >= 40 and checkpoint % 20 == 0, steps  # from the last checkpoint, not from 0
        rows = json.loads(cli("status", run_id, "--json").stdout)
        assert rows["run"]["submissions"] == [run_id, f"{run_id}-r1"], rows

        # 2. stopped by a person, resumed with fewer workers once --force says so
        _wait_for(lambda: max(_logged_steps(run_dir)[restart:], default=0) >= checkpoint + 20, 300,
                  "a checkpoint of the recovered pretrain")
        stopped = cli("stop", run_id)
        assert stopped.returncode == 0, stopped.stderr
        assert RunRecord.load(str(run_dir)).state is RunState.STOPPED
        edited = yaml.safe_load(path.read_text())
        edited["pretrain"]["num_workers"] = 1
        path.write_text(yaml.safe_dump(edited))
        refused = cli("resume", run_id)
        assert refused.returncode == 2 and "changed since run" in refused.stderr and "--force" in refused.stderr
        time.sleep(3)  # three passes of the watcher over a stopped run: it must leave it alone
        assert RunRecord.load(str(run_dir)).state is RunState.STOPPED
        resumed = cli("resume", run_id, "--force")
        assert resumed.returncode == 0, resumed.stderr
        _wait_for(lambda: RunRecord.load(str(run_dir)).state is not RunState.STOPPED, 120, "the resumed driver")
        record = _wait_for(lambda: (r := RunRecord.load(str(run_dir))).state.is_terminal() and r, 400, "the run's end")
        assert record.state is RunState.SUCCEEDED, record.error
    finally:
        watcher.terminate()
        said = watcher.communicate(timeout=30)[0]
    assert watcher.returncode == 0, said
    assert said.count("recovered run ") == 1, said
    assert f"recovered run {run_id} (the cluster at {cluster.address} no longer knows its Ray job (restarted))" in said
    pretrain = record.job("pretrain")
    assert pretrain.outputs["workers"] == 1 and pretrain.outputs["resumed_from"] >= checkpoint + 20
    assert any("was written by 2 worker(s); resharding it for 1" in w for w in pretrain.outputs.get("warnings", []))
    assert record.job("tokenizer").attempts == 1  # finished jobs are never redone
    assert json.loads(cli("status", run_id, "--json").stdout)["run"]["submissions"] == \
        [run_id, f"{run_id}-r1", f"{run_id}-r2"]
