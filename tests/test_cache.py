"""The stage cache: keys change exactly when inputs do; a second run computes nothing."""

from __future__ import annotations

import copy
import json

import pytest

from branchout.orchestrator.cache import expand_rerun, job_keys
from branchout.orchestrator.loader import load_spec
from branchout.orchestrator.state import RunRecord, RunState, StageState

from conftest import TINY, run_cli

FPS = {"pretrain": "p0", "legal": "l0", "code": "c0", "docs": "d0"}


def _keys(write_pipeline, mutate=None, fps=None):
    spec = copy.deepcopy(TINY)
    if mutate:
        mutate(spec)
    return job_keys(load_spec(write_pipeline(spec)), fps or FPS)


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if a[k] != b[k]}


@pytest.mark.unit
def test_keys_follow_inputs(write_pipeline):
    base = _keys(write_pipeline)
    assert base == _keys(write_pipeline)  # deterministic
    # one domain's data changed: only that domain's jobs
    assert _changed(base, _keys(write_pipeline, fps={**FPS, "legal": "l1"})) == {
        "data/legal", "finetune/legal", "scratch/legal", "evaluate/legal"}
    # the pretrain section changed: the pretrain and everything started from it
    changed = _changed(base, _keys(write_pipeline, lambda s: s["pretrain"]["optimizer"].update(lr=1e-3)))
    assert changed == {"pretrain", "finetune/legal", "finetune/code", "finetune/docs",
                       "evaluate/legal", "evaluate/code", "evaluate/docs"}  # baselines do not use it
    # the pretraining data changed: the tokenizer, hence every block of every dataset
    assert _changed(base, _keys(write_pipeline, fps={**FPS, "pretrain": "p1"})) == set(base)
    # settings that cannot change an output change no key
    assert not _changed(base, _keys(write_pipeline, lambda s: s["pretrain"].update(log_every=1, checkpoint_every=3)))
    # one domain's options changed
    assert _changed(base, _keys(write_pipeline, lambda s: s["finetune"]["domains"][1].update(steps=9))) == {
        "finetune/code", "scratch/code", "evaluate/code"}


@pytest.mark.unit
@pytest.mark.parametrize("library", ["torch", "transformers", "deepspeed", "peft", "tokenizers"])
def test_a_library_upgrade_changes_every_key(write_pipeline, monkeypatch, library):
    import importlib.metadata

    from branchout.orchestrator import cache

    before = _keys(write_pipeline)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "999.0" if name == library else real(name))
    cache.code_version.cache_clear()
    try:
        after = _keys(write_pipeline)
    finally:
        cache.code_version.cache_clear()
    assert _changed(before, after) == set(before)


@pytest.mark.unit
def test_orchestrator_code_that_shapes_outputs_is_in_the_key():
    from branchout.orchestrator.cache import OUTPUT_CODE

    # the modules that turn a spec into jobs: defaults, derived steps, job options, eval rows
    assert {"stages", "orchestrator/spec.py", "orchestrator/plan.py", "orchestrator/driver.py"} <= set(OUTPUT_CODE)


@pytest.mark.unit
def test_rerun_names(write_pipeline):
    spec = load_spec(write_pipeline())
    assert expand_rerun(spec, ["legal"]) == {"finetune/legal", "scratch/legal", "evaluate/legal"}
    assert expand_rerun(spec, ["pretrain"]) == {"pretrain", "finetune/legal", "finetune/code", "finetune/docs",
                                               "evaluate/legal", "evaluate/code", "evaluate/docs"}
    assert "data/code" in expand_rerun(spec, ["tokenizer"])
    with pytest.raises(ValueError, match="--rerun 'legl': not a job, stage or domain of tiny"):
        expand_rerun(spec, ["legl"])


def _states(run_dir) -> dict[str, str]:
    return {k: v.state.value for k, v in RunRecord.load(str(run_dir)).stages.items()}


def _run(path, tmp_path, *args: str):
    """``branchout run`` once; returns its output and the run directory it created."""
    root = tmp_path / "runs" / "tiny"
    before = set(root.iterdir()) if root.exists() else set()
    out = run_cli("run", str(path), *args)
    assert out.returncode == 0, out.stdout[-3000:]
    (created,) = set(root.iterdir()) - before
    return out, created


@pytest.mark.e2e
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

    with open(data / "legal.jsonl", "a") as f:  # new legal data arrives
        f.write(json.dumps({"text": "This licence is granted for the new contract. " * 40}) + "\n")
    _, run3 = _run(path, tmp_path)
    states = _states(run3)
    computed = {k for k, v in states.items() if v == "succeeded"}
    assert computed == {"data/legal", "finetune/legal", "scratch/legal", "evaluate/legal"}, states
    assert {v for k, v in states.items() if k not in computed} == {"cached"}

    # a damaged cached output is not reused: that job is computed again
    victim = run1 / "finetune" / "code" / "model" / "model.safetensors"
    with open(victim, "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff\xff\xff")
    _, run4 = _run(path, tmp_path)
    states = _states(run4)
    assert states["finetune/code"] == "succeeded" and states["evaluate/code"] == "succeeded"
    assert states["finetune/legal"] == "cached" and states["pretrain"] == "cached"

    _, run5 = _run(path, tmp_path, "--rerun", "docs")
    states = _states(run5)
    assert states["finetune/docs"] == "succeeded" and states["finetune/code"] == "cached"
    record = RunRecord.load(str(run5))
    assert record.state is RunState.SUCCEEDED
    assert record.stage("pretrain").state is StageState.CACHED
    assert record.stage("pretrain").outputs["cached_from"] == run1.name

    # lineage of the last run: computed and cached jobs, and a model's own chain
    tree = run_cli("lineage", record.run_id)
    assert tree.returncode == 0, tree.stderr
    assert f"cached from run {run1.name}" in tree.stdout and "finetune/docs" in tree.stdout
    assert "data: pretrain fp" in tree.stdout or "pretrain fp" in tree.stdout
    model = record.stage("finetune/docs").outputs["model_uri"]
    chain = run_cli("lineage", model)
    assert chain.returncode == 0, chain.stderr
    assert "finetune/docs" in chain.stdout and "finetune/legal" not in chain.stdout
    assert "## Lineage" in (run5 / "report.md").read_text()
