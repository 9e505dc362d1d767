"""Chaos: real training processes die with SIGKILL mid-run; what does the run do about it?

- a 2-worker DeepSpeed pretrain on a mixture (``pretrain.datasets``: general text at 0.8,
  docs at 0.2) loses rank 0 at step 25: Ray Train restarts the group, the run resumes from
  the step-20 checkpoint, and steps 21-25, trained twice, have the losses the uninterrupted
  attempt had (model, optimizer, scheduler, RNG and data position, the mixture's included,
  all restored: from there on the trajectory is the one of the run left alone); the resumed
  attempt's workers read the two sources 0.8/0.2, counted;
- fan-out workers die: a domain with retries left is retried from its own checkpoint and
  succeeds, one without fails alone, the third domain is untouched.

The kills come from ``BRANCHOUT_FAULTS`` (``stages.training.faults``): the worker SIGKILLs itself
right after logging the named step, so the kill lands at that exact step however loaded
the machine is. An external kill racing a 25 ms/step model could land before the first
checkpoint or after the job ended.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from branchout.orchestrator.run.state import JobState, RunRecord, RunState
from branchout.storage.checkpoint import newest_good

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow


def _steps(run_dir: Path, job: str) -> list[int]:
    path = run_dir / "logs" / f"{job.replace('/', '-')}.metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _attempts(run_dir: Path, job: str) -> list[dict[int, float]]:
    """The losses each attempt logged, by step (a new attempt starts where the step goes back)."""
    path = run_dir / "logs" / f"{job.replace('/', '-')}.metrics.jsonl"
    attempts: list[dict[int, float]] = []
    for r in map(json.loads, path.read_text().splitlines()):
        if "loss" not in r:
            continue
        if not attempts or r["step"] <= max(attempts[-1]):
            attempts.append({})
        attempts[-1][r["step"]] = r["loss"]
    return attempts


def _run_dir(storage: Path) -> Path | None:
    found = list(storage.glob("*/*/state.json"))
    return found[0].parent if found else None


def _write(spec: dict, corpus_dir: Path, folder: Path) -> Path:
    import yaml

    spec = copy.deepcopy(spec)
    spec["storage"] = str(folder / "runs")
    for ds in [spec["pretrain"].get("dataset"), *spec["pretrain"].get("datasets", [])]:
        if ds:
            ds["path"] = str(corpus_dir / ds["path"])
    for d in spec["finetune"]["domains"]:
        d["dataset"]["path"] = str(corpus_dir / d["dataset"]["path"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder / "pipeline.yaml"


@pytest.fixture(scope="module")
def chaos(corpus_dir, tmp_path_factory):
    """One pipeline run with kills in both stages: a pretrain rank at step 25; code's
    fine-tune at 50 (one retry left), docs' at 30 (none). It serves both tests: a run costs a
    Ray start and every stage's workers. The pretrain's own first attempt is its reference
    (the steps it trained before the kill), so no second, undisturbed run is needed."""
    spec = copy.deepcopy(TINY)
    spec["pretrain"].update(steps=40, checkpoint_every=10, log_every=1, eval_every=10, datasets=[
        {"name": "general", "path": "general.jsonl", "weight": 0.8}, {"name": "docs", "path": "docs.jsonl", "weight": 0.2}])
    del spec["pretrain"]["dataset"]
    spec["evaluate"]["models"] = ["base", "finetuned"]
    legal, code, docs = spec["finetune"]["domains"]
    code.update(steps=60, checkpoint_every=20, max_retries=1)
    docs.update(steps=60, checkpoint_every=20, max_retries=0)
    legal.update(max_retries=0)
    tmp = tmp_path_factory.mktemp("chaos")
    # the module's own registry and caches: each test's (conftest.isolated_state) ends with it
    env = {"BRANCHOUT_REGISTRY": f"sqlite:///{tmp / 'registry.db'}", "BRANCHOUT_CACHE_DIR": str(tmp / "cache")}
    out = run_cli("run", str(_write(spec, corpus_dir, tmp / "b")),
                  env={**env, "BRANCHOUT_FAULTS": "pretrain@25,finetune/code@50,finetune/docs@30"})
    assert out.returncode == 1, out.stdout[-3000:]  # docs had no retries left
    return _run_dir(tmp / "b" / "runs"), out, env


def test_worker_killed_mid_pretrain(chaos):
    run_dir, out, _ = chaos
    assert (run_dir / "pretrain" / "FAULT-25").exists()  # the kill happened
    steps = _steps(run_dir, "pretrain")
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    before_kill, resumed_at = steps[restart - 1], steps[restart] - 1
    assert (before_kill, resumed_at) == (25, 20), steps  # from the newest checkpoint, not step 0
    assert steps[-1] == 40
    pretrain = RunRecord.load(str(run_dir)).job("pretrain")
    assert pretrain.state is JobState.SUCCEEDED
    # the restart is visible: a second attempt, why the first ended, a line on the display
    assert pretrain.attempts == 2, pretrain.history
    died = re.fullmatch(r"worker died at step ~(\d+); restarted from step 20", pretrain.history[0]["error"])
    assert died and int(died[1]) <= 25, pretrain.history
    assert "pretrain: worker died at step ~" in out.stdout

    # the steps trained twice: the resumed attempt repeats the uninterrupted one, step by step
    first, resumed = _attempts(run_dir, "pretrain")
    assert sorted(set(first) & set(resumed)) == list(range(resumed_at + 1, before_kill + 1))
    assert all(abs(first[s] - resumed[s]) / first[s] < 0.01 for s in range(resumed_at + 1, before_kill + 1)), \
        (first, resumed)
    assert resumed[40] < first[1]  # and it trained on to the end
    # the mixture as trained: steps 21-40 are 160 blocks, read 0.8/0.2 from their own data jobs
    assert pretrain.outputs["mixture_blocks"] == {"pretrain/general": 128, "pretrain/docs": 32}
    record = RunRecord.load(str(run_dir))
    assert all(record.job(f"data/pretrain/{s}").state is JobState.SUCCEEDED for s in ("general", "docs"))
    # eval_every: each source's held-out loss, scored by both workers every 10 steps, and their
    # weighted mean (10 and 20 by the first attempt, 30 and 40 by the resumed one)
    scored = [r for r in map(json.loads, (run_dir / "logs" / "pretrain.metrics.jsonl").read_text().splitlines())
              if "eval_loss" in r]
    assert [r["step"] for r in scored] == [10, 20, 30, 40], scored
    for r in scored:
        assert r["eval_loss"] == pytest.approx(0.8 * r["eval_loss/general"] + 0.2 * r["eval_loss/docs"])
    assert scored[-1]["eval_loss"] < scored[0]["eval_loss"]

    # the pretrain's checkpoints, in the one layout every training job has, carry both ranks'
    # manifests and verify; Ray Train's own run folder holds none
    ckpt_dir = run_dir / "pretrain" / "checkpoints"
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["step_00000030", "step_00000040"]  # keep_checkpoints: 2, the last step included
    assert not list((run_dir / "pretrain" / "ray").rglob("*.pt"))
    assert newest_good(str(ckpt_dir), names, world=2)[0] == names[-1]
    newest = ckpt_dir / names[-1]
    victim = next(p for p in newest.rglob("*optim_states.pt"))
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    name, _, skipped = newest_good(str(ckpt_dir), names, world=2)
    assert name == names[0] and victim.name in skipped[0]


def test_domain_workers_killed(chaos):
    run_dir, _, env = chaos
    record = RunRecord.load(str(run_dir))
    assert record.state is RunState.FAILED and record.error == "failed: finetune/docs"
    code_job = record.job("finetune/code")
    assert code_job.state is JobState.SUCCEEDED and code_job.attempts == 2
    assert code_job.history[0]["state"] == "failed" and "died" in code_job.history[0]["error"].lower()
    assert code_job.outputs["resumed_from"] == 40  # its newest checkpoint before the kill at 50
    assert _steps(run_dir, "finetune/code")[-1] == 60
    docs_job = record.job("finetune/docs")
    assert docs_job.state is JobState.FAILED and docs_job.attempts == 1
    assert record.job("finetune/legal").attempts == 1
    assert record.job("finetune/legal").state is JobState.SUCCEEDED
    for domain in ("legal", "code", "docs"):  # the base is scored even where the fine-tune failed
        assert record.job(f"evaluate/{domain}").state is JobState.SUCCEEDED
    # the succeeded job's resume points are removed once recorded; the failed one keeps its own
    assert not (run_dir / "finetune" / "code" / "checkpoints").exists()
    assert [p.name for p in (run_dir / "finetune" / "docs" / "checkpoints").iterdir()] == ["step_00000020"]
    status = run_cli("status", record.run_id, env=env)
    assert "attempt 1" in status.stdout and "died" in status.stdout.lower()
