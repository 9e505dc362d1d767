"""The stage cache: keys change exactly when inputs do; a second run computes nothing."""

from __future__ import annotations

import copy
import json

import pytest

from branchout.orchestrator.run.state import JobState, RunRecord, RunState

from conftest import TINY, run_cli

FPS = {"pretrain": "p0", "legal": "l0", "code": "c0", "docs": "d0"}


def _states(run_dir) -> dict[str, str]:
    return {k: v.state.value for k, v in RunRecord.load(str(run_dir)).jobs.items()}


def _run(path, tmp_path, *args: str):
    """``branchout run`` once; returns its output and the run directory it created."""
    root = tmp_path / "runs" / "tiny"
    before = set(root.iterdir()) if root.exists() else set()
    out = run_cli("run", str(path), *args)
    assert out.returncode == 0, out.stdout[-3000:]
    (created,) = set(root.iterdir()) - before
    return out, created


@pytest.mark.slow
def test_second_run_is_all_cached_then_only_changes_rerun(write_pipeline, corpus_dir, tmp_path):
    import shutil

    data = tmp_path / "data"  # a private copy: this test edits a domain's file
    shutil.copytree(corpus_dir, data)
    spec = copy.deepcopy(TINY)
    spec["pretrain"]["dataset"]["path"] = str(data / "general.jsonl")
    for d in spec["finetune"]["domains"]:
        d["dataset"]["path"] = str(data / d["dataset"]["path"])
    path = write_pipeline(spec)

    _, run1 = _run(path, tmp_path)

    # Nothing changed: nothing is computed. (How much time that saves is a benchmark,
    # benchmarks/cache.py; a wall-clock ratio here failed whenever the machine was busy.)
    _, run2 = _run(path, tmp_path)
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
    _, run3 = _run(path, tmp_path, "--rerun", "docs")
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
    tree = run_cli("lineage", record.run_id)
    assert tree.returncode == 0, tree.stderr
    assert f"cached from run {run1.name}" in tree.stdout and "finetune/docs" in tree.stdout
    assert "data: pretrain fp" in tree.stdout or "pretrain fp" in tree.stdout
    model = record.job("finetune/docs").outputs["model_uri"]
    chain = run_cli("lineage", model)
    assert chain.returncode == 0, chain.stderr
    assert "finetune/docs" in chain.stdout and "finetune/legal" not in chain.stdout
    assert "## Lineage" in (run3 / "report.md").read_text()
