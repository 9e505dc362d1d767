"""Chaos: SIGKILL real training processes mid-run and check what the run does about it.

- a 2-worker DeepSpeed pretrain loses a worker: Ray Train restarts the group, the run
  resumes from the last checkpoint, redoes at most one checkpoint interval, and ends
  within 1% of the same run left alone;
- fan-out workers are killed: a domain with retries left is retried from its own
  checkpoint and succeeds, one without fails alone, the third domain is untouched.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from branchout.orchestrator.state import RunRecord, RunState, StageState
from branchout.stages.checkpoint import newest_good

from conftest import TINY, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _steps(run_dir: Path, job: str) -> list[int]:
    path = run_dir / "logs" / f"{job.replace('/', '-')}.metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _losses(run_dir: Path, job: str) -> dict[int, float]:
    path = run_dir / "logs" / f"{job.replace('/', '-')}.metrics.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def _run_dir(storage: Path) -> Path | None:
    found = list(storage.glob("*/*/state.json"))
    return found[0].parent if found else None


def _start(path) -> subprocess.Popen:
    return subprocess.Popen(["branchout", "run", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _kill_when(proc, storage: Path, job: str, at_step: int, timeout: float = 300) -> int:
    """SIGKILL ``job``'s worker process once it has logged ``at_step``; returns the pid."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        run_dir = _run_dir(storage)
        if run_dir is None or max(_steps(run_dir, job), default=0) < at_step:
            continue
        try:
            pid = RunRecord.load(str(run_dir)).stage(job).outputs.get("pid")
        except (ValueError, KeyError):
            continue
        if pid:
            os.kill(pid, signal.SIGKILL)
            return pid
    proc.kill()
    raise AssertionError(f"{job} never reached step {at_step}:\n{proc.communicate()[0][-3000:]}")


def test_worker_killed_mid_pretrain(write_pipeline, tmp_path):
    spec = copy.deepcopy(TINY)
    spec["pretrain"].update(steps=40, checkpoint_every=10, log_every=1)
    spec["finetune"]["defaults"]["steps"] = 2
    spec["evaluate"]["models"] = ["base"]

    baseline = run_cli("run", str(write_pipeline(spec, name="baseline.yaml", storage=str(tmp_path / "a"))))
    assert baseline.returncode == 0, baseline.stdout[-3000:]

    proc = _start(write_pipeline(spec, name="chaos.yaml", storage=str(tmp_path / "b")))
    _kill_when(proc, tmp_path / "b", "pretrain", at_step=25)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]

    run_dir = _run_dir(tmp_path / "b")
    steps = _steps(run_dir, "pretrain")
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    before_kill, resumed_at = steps[restart - 1], steps[restart] - 1
    assert resumed_at % 10 == 0 and resumed_at > 0, steps  # from a checkpoint, not from step 0
    assert before_kill - resumed_at <= 10, steps  # redid at most one checkpoint interval
    assert steps[-1] == 40

    final = RunRecord.load(str(run_dir)).stage("pretrain").outputs["final_loss"]
    expected = RunRecord.load(str(_run_dir(tmp_path / "a"))).stage("pretrain").outputs["final_loss"]
    assert abs(final - expected) / expected < 0.01, (final, expected)
    # the resumed trajectory is the uninterrupted one, step by step
    a, b = _losses(_run_dir(tmp_path / "a"), "pretrain"), _losses(run_dir, "pretrain")
    assert all(abs(a[s] - b[s]) / a[s] < 0.01 for s in range(resumed_at + 1, 41))

    # every Ray Train checkpoint carries both ranks' manifests and verifies
    ray_dir = run_dir / "pretrain" / "ray"
    names = sorted((p.relative_to(ray_dir).as_posix() for p in ray_dir.glob("train-*/checkpoint_2*")),
                   key=lambda n: n.split("/")[-1])
    assert len(names) == 2  # keep_checkpoints
    assert newest_good(str(ray_dir), names, world=2)[0] == names[-1]
    newest = ray_dir / names[-1]
    victim = next(p for p in newest.rglob("*optim_states.pt"))
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    name, _, skipped = newest_good(str(ray_dir), names, world=2)
    assert name == names[0] and victim.name in skipped[0]


def test_domain_workers_killed(write_pipeline, tmp_path):
    spec = copy.deepcopy(TINY)
    spec["evaluate"]["models"] = ["base", "finetuned"]
    legal, code, docs = spec["finetune"]["domains"]
    code.update(steps=300, checkpoint_every=20, max_retries=1)
    docs.update(steps=300, checkpoint_every=20, max_retries=0)
    legal.update(max_retries=0)
    proc = _start(write_pipeline(spec))
    _kill_when(proc, tmp_path / "runs", "finetune/code", at_step=40)
    _kill_when(proc, tmp_path / "runs", "finetune/docs", at_step=40)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, output[-3000:]  # docs had no retries left

    record = RunRecord.load(str(_run_dir(tmp_path / "runs")))
    assert record.state is RunState.FAILED and record.error == "failed: finetune/docs"
    code_job = record.stage("finetune/code")
    assert code_job.state is StageState.SUCCEEDED and code_job.attempts == 2
    assert code_job.history[0]["state"] == "failed" and "died" in code_job.history[0]["error"].lower()
    assert code_job.outputs["resumed_from"] >= 20 and code_job.outputs["resumed_from"] % 20 == 0
    docs_job = record.stage("finetune/docs")
    assert docs_job.state is StageState.FAILED and docs_job.attempts == 1
    assert record.stage("finetune/legal").attempts == 1
    assert record.stage("finetune/legal").state is StageState.SUCCEEDED
    for domain in ("legal", "code", "docs"):  # the base is scored even where the fine-tune failed
        assert record.stage(f"evaluate/{domain}").state is StageState.SUCCEEDED
    status = run_cli("status", record.run_id)
    assert "attempt 1" in status.stdout and "died" in status.stdout.lower()
