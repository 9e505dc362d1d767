"""Pretraining mixtures (``pretrain.datasets``): the interleaving by weight, the spec, the
jobs and keys they make, and the general text a mixture is scored on."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from branchout.core.graph import Kind, build_graph
from branchout.orchestrator.config.loader import load_spec
from branchout.orchestrator.run.cache import job_keys
from branchout.stages.training.batches import step_micro_batches
from branchout.stages.training.mixture import MixtureOrder, source_counts

from conftest import TINY, run_cli

SOURCES = [{"name": "web", "path": "general.jsonl", "weight": 0.8}, {"name": "books", "path": "docs.jsonl", "weight": 0.2}]
FPS = {"pretrain/web": "w0", "pretrain/books": "b0", "legal": "l0", "code": "c0", "docs": "d0"}


def _mixture(sources=SOURCES) -> dict:
    spec = copy.deepcopy(TINY)
    del spec["pretrain"]["dataset"]
    spec["pretrain"]["datasets"] = copy.deepcopy(sources)
    return spec


@pytest.mark.parametrize("seed", range(20))
def test_every_prefix_holds_each_source_by_weight(seed):
    rng = np.random.default_rng(seed)
    weights = rng.random(rng.integers(2, 6)) + 0.01
    weights /= weights.sum()
    n = np.arange(3000)
    counts = source_counts(weights, n)
    steps = np.diff(counts, axis=1)
    assert set(np.unique(steps)) <= {0, 1} and (steps.sum(axis=0) == 1).all()  # one source per sample
    assert (counts.sum(axis=0) == n).all()
    assert np.abs(counts - np.outer(weights, n)).max() < len(weights)  # within a block per level


def test_the_order_is_a_function_of_the_position_and_any_world_reads_the_same_samples():
    order = MixtureOrder([50, 13], [0.8, 0.2], seed=3)
    whole = order.blocks(0, 400)
    assert (np.concatenate([order.blocks(s, 40) for s in range(0, 400, 40)]) == whole).all()  # resume anywhere
    assert ((whole < 50).sum(), (whole >= 50).sum()) == (320, 80)
    # each source goes through an epoch of its own blocks before repeating one
    assert sorted(whole[whole >= 50][:13] - 50) == list(range(13))
    for step in range(5):  # the ranks' micro-batches of a step are the one-worker step's samples
        one = np.concatenate(step_micro_batches(order, step, 8, 2, 0, 1))
        two = np.concatenate([b for r in range(2) for b in step_micro_batches(order, step, 8, 2, r, 2)])
        assert sorted(one) == sorted(two)


def test_a_mixture_is_data_jobs_per_source_and_a_weight_retokenizes_nothing(write_pipeline):
    spec = load_spec(write_pipeline(_mixture()))
    graph = build_graph(spec)
    assert [n.name for n in graph.of(Kind.DATA)][:2] == ["data/pretrain/web", "data/pretrain/books"]
    assert graph["pretrain"].parents == {"tokenizer": "tokenizer", "data:pretrain/web": "data/pretrain/web",
                                         "data:pretrain/books": "data/pretrain/books"}
    # a domain's held-out text is decontaminated against both sources
    assert {r: p for r, p in graph["data/legal"].parents.items() if r.startswith("reference")} == {
        "reference:pretrain/web": "data/pretrain/web", "reference:pretrain/books": "data/pretrain/books"}
    base = job_keys(graph, FPS)
    heavier = _mixture([{**SOURCES[0], "weight": 0.5}, {**SOURCES[1], "weight": 0.5}])
    changed = {k for k, v in job_keys(build_graph(load_spec(write_pipeline(heavier))), FPS).items() if base[k] != v}
    assert "tokenizer" not in changed and not any(k.startswith("data/") for k in changed)
    assert "pretrain" in changed
    # a source's data changed: the tokenizer it shapes, hence everything
    assert {k for k, v in job_keys(graph, {**FPS, "pretrain/books": "b1"}).items() if base[k] != v} == set(base)


def test_mixture_mistakes_are_one_line_each(write_pipeline):
    both = _mixture()
    both["pretrain"]["dataset"] = {"path": "general.jsonl"}
    twice = _mixture([SOURCES[0], {**SOURCES[1], "name": "web", "weight": 0}])
    for spec, wanted in [(both, "give exactly one of `dataset` (one corpus) or `datasets` (a mixture)"),
                         (twice, "pretrain.datasets.1.weight: Input should be greater than 0")]:
        out = run_cli("validate", str(write_pipeline(spec)))
        assert out.returncode == 2 and wanted in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_a_mixtures_general_perplexity_is_its_sources_weighted_as_trained(write_pipeline):
    from branchout.orchestrator.run.report import cross_matrix

    spec = load_spec(write_pipeline({**_mixture(), "evaluate": {**TINY["evaluate"], "cross": True}}))
    graph = build_graph(spec)
    assert {r: p for r, p in graph["cross/base"].parents.items() if r.startswith("heldout:")} == {
        "heldout:general/web": "data/pretrain/web", "heldout:general/books": "data/pretrain/books"}

    class Record:  # the cross jobs' recorded outputs
        def job(self, name):
            ppl = {"base": {"general/web": 10.0, "general/books": 40.0}} if name == "cross/base" else {}
            return type("Job", (), {"outputs": {"ppl": ppl}})()

    cross = cross_matrix(graph, Record(), {})
    assert list(cross["base"]) == ["general", "general/web", "general/books"]
    assert cross["base"]["general"] == pytest.approx(10.0 ** 0.8 * 40.0 ** 0.2)


def test_replay_mixes_the_pretraining_corpora_into_the_fine_tune_only(write_pipeline):
    from branchout.orchestrator.run.driver import replay_sources

    spec = _mixture()
    spec["finetune"]["domains"][0]["replay"] = 0.1
    graph = build_graph(load_spec(write_pipeline(spec)))
    replayed = {r: p for r, p in graph["finetune/legal"].parents.items() if r.startswith("replay:")}
    assert replayed == {"replay:pretrain/web": "data/pretrain/web", "replay:pretrain/books": "data/pretrain/books"}
    assert not any(r.startswith("replay:") for r in graph["scratch/legal"].parents)  # the baseline: domain only
    assert not any(r.startswith("replay:") for r in graph["finetune/code"].parents)
    data = {k: type("Info", (), {"uri": f"mem://{k}"})() for k in ("pretrain/web", "pretrain/books")}
    shares = replay_sources(graph.spec, graph["finetune/legal"], data)
    assert [(k, round(w, 6)) for k, _, w in shares] == [("pretrain/web", 0.08), ("pretrain/books", 0.02)]
    base = job_keys(build_graph(load_spec(write_pipeline(_mixture()))), FPS)
    changed = {k for k, v in job_keys(graph, FPS).items() if base[k] != v}
    assert changed == {"finetune/legal", "evaluate/legal"}


def test_replay_mistakes_are_one_line_each(write_pipeline):
    short = copy.deepcopy(TINY)
    short["finetune"]["domains"][0].update(replay=0.1, seq_len=16)
    out = run_cli("validate", str(write_pipeline(short)))
    assert out.returncode == 2, out.stdout
    assert ("finetune.domains.0.replay: it replays the pretraining corpus's blocks of pretrain.seq_len = 32 "
            "tokens; this domain's seq_len is 16") in out.stderr
