"""The stage cache: keys change exactly when inputs do; a second run computes nothing."""

from __future__ import annotations

import copy

import pytest

from branchout.core.graph import build_graph
from branchout.orchestrator.config.loader import load_spec
from branchout.orchestrator.run.cache import job_keys

from conftest import TINY

FPS = {"pretrain": "p0", "legal": "l0", "code": "c0", "docs": "d0"}


def _keys(write_pipeline, mutate=None, fps=None):
    spec = copy.deepcopy(TINY)
    if mutate:
        mutate(spec)
    return job_keys(build_graph(load_spec(write_pipeline(spec))), fps or FPS)


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if a[k] != b[k]}


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


@pytest.mark.parametrize("library", ["torch", "transformers", "deepspeed", "peft", "tokenizers"])
def test_a_library_upgrade_changes_every_key(write_pipeline, monkeypatch, library):
    import importlib.metadata


    before = _keys(write_pipeline)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "999.0" if name == library else real(name))
    assert _changed(before, _keys_with_fresh_code_version(write_pipeline)) == set(before)


def test_code_that_changes_changes_the_key_at_any_depth(tmp_path):
    """Each edit of worker code, moved code or a renamed file must change the hash."""
    from branchout.orchestrator.run.cache import code_hash

    (tmp_path / "stages" / "training").mkdir(parents=True)
    (tmp_path / "stages" / "data.py").write_text("STEPS = 1\n")
    (tmp_path / "stages" / "training" / "recipe.py").write_text("LR = 0.1\n")
    (tmp_path / "core.py").write_text("X = 1\n")
    entries = ("stages", "core.py")
    seen = {code_hash(tmp_path, entries)}
    for edit in (lambda: (tmp_path / "stages" / "data.py").write_text("STEPS = 2\n"),
                 lambda: (tmp_path / "stages" / "training" / "recipe.py").write_text("LR = 0.2\n"),  # a subfolder
                 lambda: (tmp_path / "core.py").write_text("X = 2\n"),
                 lambda: (tmp_path / "stages" / "training" / "recipe.py").rename(tmp_path / "stages" / "recipe.py")):
        edit()
        seen.add(code_hash(tmp_path, entries))
    assert len(seen) == 5
    (tmp_path / "stages" / "notes.txt").write_text("not code")
    assert code_hash(tmp_path, entries) in seen  # only Python files count


def test_orchestrator_code_that_shapes_outputs_is_in_the_key():
    from branchout.orchestrator.run.cache import OUTPUT_CODE

    # the modules that turn a spec into jobs: defaults, derived steps, job options, eval rows
    assert {"stages", "core/spec.py", "orchestrator/config/plan.py", "orchestrator/run/driver.py"} <= set(OUTPUT_CODE)


def test_rerun_names(write_pipeline):
    graph = build_graph(load_spec(write_pipeline()))
    assert graph.select(["legal"]) == {"finetune/legal", "scratch/legal", "evaluate/legal"}
    assert graph.select(["pretrain"]) == {"pretrain", "finetune/legal", "finetune/code", "finetune/docs",
                                               "evaluate/legal", "evaluate/code", "evaluate/docs"}
    assert "data/code" in graph.select(["tokenizer"])
    with pytest.raises(ValueError, match="--rerun 'legl': not a job, stage or domain of tiny"):
        graph.select(["legl"])


def test_the_code_hash_is_in_every_jobs_key(write_pipeline, monkeypatch):
    """Deleting the code hash from code_version left the suite green (issue 33): each job's key
    must move when the worker code's bytes do."""
    from branchout.orchestrator.run import cache

    before = _keys(write_pipeline)
    monkeypatch.setattr(cache, "code_hash", lambda root, entries: "edited")
    assert _changed(before, _keys_with_fresh_code_version(write_pipeline)) == set(before)


def _keys_with_fresh_code_version(write_pipeline):
    """The jobs' keys with code_version computed again (it is cached per process), then
    forgotten, so the next test sees the real one."""
    from branchout.orchestrator.run import cache

    cache.code_version.cache_clear()
    try:
        return _keys(write_pipeline)
    finally:
        cache.code_version.cache_clear()


def test_an_existing_models_files_are_in_the_keys_of_the_jobs_built_on_them(write_pipeline, tmp_path):
    """``model.path``: the pretrain (a continued or copied model) and the from-scratch baselines
    (its architecture) depend on the model's files; a new revision or changed file recomputes
    them and what follows, never the tokenizer or the data."""
    from branchout.orchestrator.run.cache import model_fingerprint

    graph = build_graph(load_spec(write_pipeline(copy.deepcopy(TINY))))
    scratch = {f"scratch/{d}" for d in ("legal", "code", "docs")}
    downstream = {"pretrain", *scratch, *(f"{k}/{d}" for k in ("finetune", "evaluate") for d in ("legal", "code", "docs"))}
    built = job_keys(graph, FPS)
    graph.spec.model.path = "org/base-model"  # a hub id: no files here, named by id and revision
    assert model_fingerprint("org/base-model", None) == "hub:org/base-model@main"
    hub = job_keys(graph, FPS)
    assert _changed(built, hub) == downstream
    graph.spec.model.revision = "v2"
    assert _changed(hub, job_keys(graph, FPS)) == downstream
    # a folder: every file's name, size and time, at any depth
    folder = tmp_path / "model"
    (folder / "shards").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "shards" / "model-1.safetensors").write_bytes(b"w" * 64)
    graph.spec.model.path = str(folder)
    local = job_keys(graph, FPS)
    assert local == job_keys(graph, FPS) and _changed(hub, local) == downstream
    (folder / "shards" / "model-1.safetensors").write_bytes(b"w" * 65)
    assert _changed(local, job_keys(graph, FPS)) == downstream


def test_key_parts_hash_the_same_whatever_their_order_in_a_mapping():
    from branchout.orchestrator.run.cache import _h

    assert _h({"lr": 1e-3, "steps": 8}) == _h({"steps": 8, "lr": 1e-3})
    assert _h({"lr": 1e-3, "steps": 8}) != _h({"lr": 1e-3, "steps": 9})


def test_the_cache_answers_only_with_outputs_that_still_verify(tmp_path):
    from pathlib import Path

    from branchout.orchestrator.run.cache import StageCache
    from branchout.storage.checkpoint import publish_dir

    def published(name: str) -> str:
        src = tmp_path / "src" / name
        src.mkdir(parents=True)
        (src / "weights.bin").write_bytes(b"x" * 100)
        uri = str(tmp_path / "runs" / name)
        publish_dir(str(src), uri)
        return uri

    storage_root = str(tmp_path / "runs")
    cache = StageCache(storage_root)
    assert cache.lookup("pretrain", "k1") is None  # nothing recorded
    model, blocks = published("model"), published("blocks")
    cache.store("pretrain", "k1", "run-1", {"model_uri": model, "steps": 12, "pid": 7, "node": "n1"})
    cache.store("data/legal", "k2", "run-1", {"uri": blocks, "cached_from": "run-0"})
    assert cache.lookup("pretrain", "k1") == {"model_uri": model, "steps": 12, "cached_from": "run-1", "key": "k1"}
    assert cache.lookup("data/legal", "k2") == {"uri": blocks, "cached_from": "run-1", "key": "k2"}
    # off, or the job asked to run anyway (--rerun): no answer; other jobs still answered
    assert StageCache(storage_root, enabled=False).lookup("pretrain", "k1") is None
    assert StageCache(storage_root, skip={"pretrain"}).lookup("pretrain", "k1") is None
    assert StageCache(storage_root, skip={"pretrain"}).lookup("data/legal", "k2") is not None
    # a recorded output changed since (same size, other bytes): computed again
    (Path(model) / "weights.bin").write_bytes(b"y" * 100)
    assert cache.lookup("pretrain", "k1") is None
    (Path(blocks) / "weights.bin").unlink()
    assert cache.lookup("data/legal", "k2") is None
    # an index entry that does not parse is a miss, not an error
    (tmp_path / "runs" / "cache" / "stages" / "k3.json").write_text("{not json")
    assert cache.lookup("pretrain", "k3") is None
    (tmp_path / "runs" / "cache" / "stages" / "k4.json").mkdir()  # nor one that cannot be read
    assert cache.lookup("pretrain", "k4") is None
