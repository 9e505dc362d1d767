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
from branchout.storage.checkpoint import full_problems

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


def _wait_for(predicate, timeout: float, what: str, explain=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}\n{explain()}")


def _explain(cluster: LocalRayCluster, run_dir: Path, watcher_log: Path) -> str:
    """What a timed-out wait needs to be understood from CI's output alone: the run's state,
    what the watcher said and the end of the newest Ray job's log."""
    lines = [f"logged steps: {_logged_steps(run_dir)[-8:]}"]
    try:
        record = RunRecord.load(str(run_dir))
        lines.append(f"run: {record.state.value} {record.error or ''}")
        lines += [f"  {j.name}: {j.state.value} attempts={j.attempts} {j.error or ''}" for j in record.jobs.values()]
    except (OSError, ValueError, KeyError) as e:
        lines.append(f"run: unreadable ({e!r})")
    lines.append("watcher said:\n" + (watcher_log.read_text()[-3000:] if watcher_log.exists() else "(nothing)"))
    env = cluster.env()
    jobs = subprocess.run(["ray", "job", "list", "--address", cluster.address], env=env, capture_output=True,
                          text=True, timeout=60)
    lines.append(f"ray job list: {jobs.stdout[-1500:]}{jobs.stderr[-500:]}")
    ids = [x.split("'")[1] for x in jobs.stdout.split("submission_id=")[1:]]
    for sid in ids[-1:]:
        logs = subprocess.run(["ray", "job", "logs", sid, "--address", cluster.address], env=env,
                              capture_output=True, text=True, timeout=60)
        lines.append(f"ray job logs {sid} (end):\n{(logs.stdout + logs.stderr)[-4000:]}")
    return "\n".join(lines)


def _newest_whole_checkpoint(run_dir: Path) -> int:
    """The newest pretrain checkpoint every rank finished writing (manifests and hashes agree), or 0."""
    parent = run_dir / "pretrain" / "checkpoints"
    names = sorted((p.name for p in parent.glob("step_*")), reverse=True) if parent.exists() else []
    return next((int(n.removeprefix("step_")) for n in names if _whole(str(parent / n))), 0)


def _whole(uri: str) -> bool:
    try:
        return not full_problems(uri, world=2)
    except OSError:  # retention removed it while it was read: not a checkpoint to count on
        return False


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

    watcher_log = tmp_path / "watcher.log"
    with watcher_log.open("w") as sink:  # a file, not a pipe: readable while the watcher runs
        watcher = subprocess.Popen([sys.executable, "-m", "branchout", "recover", "--watch", "1"], env=env,
                                   stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        path = _pipeline(corpus_dir, tmp_path)
        out = cli("submit", str(path), "--address", cluster.address)
        assert out.returncode == 0, out.stderr
        run_id = next(x for x in out.stdout.splitlines() if x.startswith("submitted run ")).split()[2]
        run_dir = tmp_path / "runs" / "tiny" / run_id

        def explain():
            return _explain(cluster, run_dir, watcher_log)

        # 1. the head is lost once the step-40 checkpoint is whole; a new one comes up at the same address
        _wait_for(lambda: _newest_whole_checkpoint(run_dir) >= 40, 300, "the step-40 checkpoint", explain)
        cluster.stop()
        before = _logged_steps(run_dir)  # every process is gone: nothing more is written to it
        lost_at, whole = before[-1], _newest_whole_checkpoint(run_dir)
        assert RunRecord.load(str(run_dir)).state is RunState.RUNNING  # nobody recorded anything: it crashed
        cluster.start()
        # the recovered attempt appends to the same log; where it starts says which checkpoint it read
        # (the kill may land just after a checkpoint's step was logged, so the steps need not go back)
        restart = len(before)
        _wait_for(lambda: len(_logged_steps(run_dir)) > restart, 300, "the recovered pretrain's first logged step",
                  explain)
        steps = _logged_steps(run_dir)
        checkpoint = steps[restart] - 1
        # from the newest whole checkpoint (or one completed as the head died), not from 0
        assert whole <= checkpoint <= lost_at and checkpoint % 20 == 0, (whole, lost_at, steps)
        rows = json.loads(cli("status", run_id, "--json").stdout)
        assert rows["run"]["submissions"] == [run_id, f"{run_id}-r1"], rows

        # 2. stopped by a person, resumed with fewer workers once --force says so
        _wait_for(lambda: _newest_whole_checkpoint(run_dir) >= checkpoint + 20, 300,
                  "a checkpoint of the recovered pretrain", explain)
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
        _wait_for(lambda: RunRecord.load(str(run_dir)).state is not RunState.STOPPED, 120, "the resumed driver", explain)
        record = _wait_for(lambda: (r := RunRecord.load(str(run_dir))).state.is_terminal() and r, 400, "the run's end", explain)
        assert record.state is RunState.SUCCEEDED, record.error
    finally:
        watcher.terminate()
        watcher.wait(timeout=30)
        said = watcher_log.read_text()
    assert watcher.returncode == 0, said
    assert said.count("recovered run ") == 1, said
    assert f"recovered run {run_id} (the cluster at {cluster.address} no longer knows its Ray job (restarted))" in said
    pretrain = record.job("pretrain")
    assert pretrain.outputs["workers"] == 1 and pretrain.outputs["resumed_from"] >= checkpoint + 20
    assert any("was written by 2 worker(s); resharding it for 1" in w for w in pretrain.outputs.get("warnings", []))
    assert record.job("tokenizer").attempts == 1  # finished jobs are never redone
    assert json.loads(cli("status", run_id, "--json").stdout)["run"]["submissions"] == \
        [run_id, f"{run_id}-r1", f"{run_id}-r2"]
