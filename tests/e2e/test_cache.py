"""The stage cache, and a driver killed mid-fan-out: a run computes only what it must.

Both tests start from one finished tiny run (the ``seeded`` fixture): its registry and
storage hold every stage's outputs, so later runs of the same upstream find the tokenizer,
the data and the pretrain cached. The cache test checks that; the resume test uses it to
reach its fan-out without paying for a pretrain again.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from branchout.orchestrator.operate.registry import Registry
from branchout.orchestrator.run.state import JobState, RunRecord, RunState

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow


def _states(run_dir) -> dict[str, str]:
    return {k: v.state.value for k, v in RunRecord.load(str(run_dir)).jobs.items()}


@dataclass
class Seed:
    root: Path
    data: Path  # the corpora the seeded run read (the cache test edits legal.jsonl here)
    env: dict[str, str]  # its registry
    path: Path  # its pipeline file
    run: Path | None = None  # its run directory

    def runs(self) -> set[Path]:
        folder = self.root / "runs" / "tiny"
        return set(folder.iterdir()) if folder.exists() else set()


def _write(spec: dict, data: Path, storage: Path, path: Path, general: Path | None = None) -> Path:
    spec = copy.deepcopy(spec)
    spec["storage"] = str(storage)
    spec["pretrain"]["dataset"]["path"] = str(general or data / "general.jsonl")
    for d in spec["finetune"]["domains"]:
        d["dataset"]["path"] = str(data / os.path.basename(d["dataset"]["path"]))
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def seeded(corpus_dir, tmp_path_factory) -> Seed:
    root = tmp_path_factory.mktemp("seeded")
    data = root / "data"  # a private copy: the cache test edits a domain's file
    shutil.copytree(corpus_dir, data)
    seed = Seed(root, data, {"BRANCHOUT_REGISTRY": f"sqlite:///{root / 'registry.db'}"},
                _write(TINY, data, root / "runs", root / "pipeline.yaml"))
    _, seed.run = _run(seed, seed.path)
    return seed


def _run(seed: Seed, path: Path, *args: str):
    """``branchout run`` once; returns its output and the run directory it created."""
    before = seed.runs()
    out = run_cli("run", str(path), *args, env=seed.env)
    assert out.returncode == 0, out.stdout[-3000:]
    (created,) = seed.runs() - before
    return out, created


def test_second_run_is_all_cached_then_only_changes_rerun(seeded):
    path, data, run1 = seeded.path, seeded.data, seeded.run

    # Nothing changed: nothing is computed. (How much time that saves is a benchmark,
    # benchmarks/cache.py; a wall-clock ratio here failed whenever the machine was busy.)
    _, run2 = _run(seeded, path)
    assert set(_states(run2).values()) == {"cached"}, _states(run2)
    assert not (run2 / "pretrain").exists() and not (run2 / "finetune").exists()  # no job wrote anything
    metrics1 = json.loads((run1 / "eval" / "metrics.json").read_text())
    metrics2 = json.loads((run2 / "eval" / "metrics.json").read_text())
    assert metrics1["domains"] == metrics2["domains"]
    assert "cached" in (run2 / "report.md").read_text()

    # One more run (each costs a Ray start and a pretrain check) with three changes that each
    # select their own jobs: new legal data arrives; a cached output of code's fine-tune is
    # damaged, so it is not reused; --rerun names docs.
    with open(data / "legal.jsonl", "a") as f:
        f.write(json.dumps({"text": "This licence is granted for the new contract. " * 40}) + "\n")
    victim = run1 / "finetune" / "code" / "model" / "model.safetensors"
    with open(victim, "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff\xff\xff")
    _, run3 = _run(seeded, path, "--rerun", "docs")
    states = _states(run3)
    computed = {k for k, v in states.items() if v == "succeeded"}
    assert computed == {"data/legal", "finetune/legal", "scratch/legal", "evaluate/legal",  # new data
                        "finetune/code", "evaluate/code",  # damaged output, and the score that read it
                        "finetune/docs", "scratch/docs", "evaluate/docs"}, states  # --rerun docs
    assert {v for k, v in states.items() if k not in computed} == {"cached"}, states  # pretrain, scratch/code...
    record = RunRecord.load(str(run3))
    assert record.state is RunState.SUCCEEDED
    assert record.job("pretrain").state is JobState.CACHED
    assert record.job("pretrain").outputs["cached_from"] == run1.name
    assert record.job("scratch/code").outputs["cached_from"] == run1.name

    # lineage of the last run: computed and cached jobs, and a model's own chain
    tree = run_cli("lineage", record.run_id, env=seeded.env)
    assert tree.returncode == 0, tree.stderr
    assert f"cached from run {run1.name}" in tree.stdout and "finetune/docs" in tree.stdout
    assert "data: pretrain fp" in tree.stdout or "pretrain fp" in tree.stdout
    model = record.job("finetune/docs").outputs["model_uri"]
    chain = run_cli("lineage", model, env=seeded.env)
    assert chain.returncode == 0, chain.stderr
    assert "finetune/docs" in chain.stdout and "finetune/legal" not in chain.stdout
    assert "## Lineage" in (run3 / "report.md").read_text()


def test_driver_killed_mid_fanout_resumes_without_redoing_finished_domains(seeded, corpus_dir, tmp_path):
    """SIGKILL the driver in the middle of the fan-out, then `branchout resume`."""
    spec = copy.deepcopy(TINY)
    spec["evaluate"]["models"] = ["base", "finetuned"]
    spec["finetune"]["domains"][0]["steps"] = 10  # legal: trained here (not the seeded run's 8 steps), done early
    for d in spec["finetune"]["domains"][1:]:
        d.update(steps=300, checkpoint_every=20)  # code and docs are still training when legal is done
    # the seeded run's general text, at its path (the cache is keyed by path and content):
    # tokenizer, data and pretrain are cached; domain files of its own, as the corpus built
    # them, which the cache test's edit cannot reach
    # the seeded storage: its cache index is there
    path = _write(spec, corpus_dir, seeded.root / "runs", tmp_path / "pipeline.yaml",
                  general=seeded.data / "general.jsonl")
    earlier = seeded.runs()
    env = {**os.environ, **seeded.env}
    driver = subprocess.Popen(["branchout", "run", str(path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_dir = None
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.5)
        found = [r for r in seeded.runs() - earlier if (r / "state.json").exists()]
        if not found:
            continue
        run_dir = found[0]
        try:
            record = RunRecord.load(str(run_dir))
        except (ValueError, KeyError):
            continue
        code_steps = [json.loads(x)["step"] for x in
                      (run_dir / "logs" / "finetune-code.metrics.jsonl").read_text().splitlines()] \
            if (run_dir / "logs" / "finetune-code.metrics.jsonl").exists() else []
        if record.job("finetune/legal").state is JobState.SUCCEEDED and max(code_steps, default=0) >= 40:
            break
    else:
        driver.kill()
        pytest.fail("the fan-out never reached the point to interrupt:\n" + driver.communicate()[0][-3000:])
    os.kill(driver.pid, signal.SIGKILL)  # no clean-up at all; its embedded Ray goes down with it
    driver.wait()

    before = RunRecord.load(str(run_dir))
    assert before.state is RunState.RUNNING  # nobody recorded the end: the driver just vanished
    for job in ("tokenizer", "data/pretrain", "pretrain"):
        assert before.job(job).state is JobState.CACHED, job  # the seeded run's outputs
    run_id = before.run_id

    status = run_cli("status", run_id, env=env)
    assert "driver lost" in status.stdout, status.stdout
    out = run_cli("resume", run_id, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]

    after = RunRecord.load(str(run_dir))
    assert after.state is RunState.SUCCEEDED
    for job in ("tokenizer", "data/pretrain", "pretrain"):
        assert after.job(job).state is JobState.CACHED, job
    assert after.job("finetune/legal").attempts == 1  # finished before the kill: never redone
    code = after.job("finetune/code")
    assert code.attempts == 2 and code.outputs["resumed_from"] >= 40
    assert code.history[0]["state"] == "failed" and "driver" in code.history[0]["error"]
    attempts = Registry(env["BRANCHOUT_REGISTRY"]).attempts_of(run_id)
    assert [a["attempt"] for a in attempts if a["job"] == "finetune/legal"] == [1]
    assert [a["attempt"] for a in attempts if a["job"] == "finetune/code"] == [1, 2]
