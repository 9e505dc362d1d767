"""``evaluate.lm_eval``: its jobs in the graph, its scores as metrics, its tasks checked
before anything starts."""

from __future__ import annotations

import copy

from branchout.core.graph import Kind, build_graph
from branchout.orchestrator.config.loader import load_spec
from branchout.stages.evaluation.lm_eval import scores_of

from conftest import TINY


def _spec(**lm_eval) -> dict:
    spec = copy.deepcopy(TINY)
    spec["evaluate"] = {**spec["evaluate"], "models": ["base", "finetuned"], "lm_eval": {"tasks": ["arc_easy"], **lm_eval}}
    return spec


def test_a_job_per_model_on_its_fine_tunes_bundle(write_pipeline):
    graph = build_graph(load_spec(write_pipeline(_spec())))
    nodes = {n.name: n for n in graph.of(Kind.LM_EVAL)}
    assert list(nodes) == ["lm_eval/base", "lm_eval/legal", "lm_eval/code", "lm_eval/docs"]
    assert nodes["lm_eval/base"].parents == {"base": "pretrain"}
    assert nodes["lm_eval/docs"].parents == {"finetuned": "finetune/docs", "base": "pretrain"}
    assert all(n.entry == "branchout.stages.evaluation.lm_eval:run_harness" for n in nodes.values())
    # the harness's settings are in its jobs' keys only: scores by perplexity do not move
    keys = {"pretrain": "p0", "legal": "l0", "code": "c0", "docs": "d0"}
    from branchout.orchestrator.run.cache import job_keys

    a = job_keys(graph, keys)
    b = job_keys(build_graph(load_spec(write_pipeline(_spec(limit=5)))), keys)
    assert {k for k in a if a[k] != b[k]} == set(nodes)


def test_scores_are_numbers_by_task_and_metric():
    results = {"licence_mc": {"alias": "licence_mc", "sample_len": 40, "acc,none": 0.25, "acc_stderr,none": 0.07,
                              "exact_match,strict-match": 0.5}}
    assert scores_of(results) == {"licence_mc": {"acc": 0.25, "acc_stderr": 0.07, "exact_match (strict-match)": 0.5}}


def test_an_unknown_task_or_folder_is_one_line_before_anything_starts(write_pipeline, tmp_path):
    """Checked by preflight (what ``validate``, ``run`` and ``submit`` print as one line each)."""
    from branchout.orchestrator.config.preflight import preflight

    problems, _ = preflight(load_spec(write_pipeline(_spec(tasks=["arc_easy", "no_such_task"]))))
    assert problems == ["evaluate.lm_eval.tasks: no_such_task: not a task of lm-evaluation-harness "
                        "(tasks of your own: include_path)"]
    problems, _ = preflight(load_spec(write_pipeline(_spec(include_path=str(tmp_path / "missing")))))
    assert problems == [f"evaluate.lm_eval.include_path: {tmp_path / 'missing'} is not a directory of task YAML files"]
