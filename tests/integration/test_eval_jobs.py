"""Evaluation jobs: placed like the domain's fine-tune, scoring in its precision, one job per domain.

A local Ray that declares one GPU and an H100 accelerator type stands in for a GPU node
(Ray places by resources; on this CPU-only machine the job then scores on the CPU, as
every GPU job here does). The driver submits an evaluation with ``submit_task`` and the
plan's bundle for it; the tests do the same.
"""

from __future__ import annotations

import math
import time

import pytest

from conftest import eval_job, job_for, job_parts, local_ray, requires_native_bf16

H100_NODE = {"accelerator_type:H100": 1.0}


@pytest.fixture(scope="module")
def ray_gpu_node():
    with local_ray("test-eval-jobs", num_gpus=1, resources=H100_NODE):
        yield


@pytest.fixture(scope="module")
def trained(ray_gpu_node, corpus_dir, tmp_path_factory):
    """A base, a LoRA adapter and a full fine-tune of it (2 steps each), in fp32."""
    from branchout.stages.training.single_worker import run_single_worker

    parts = job_parts(tmp_path_factory.mktemp("eval"), corpus_dir)
    lora, full = job_for(parts, "lora", "lora", steps=2), job_for(parts, "full", "full", steps=2)
    run_single_worker(lora)
    run_single_worker(full)
    return parts, lora, full


def test_an_evaluation_is_placed_on_its_gpu_type_and_keeps_its_outputs(trained):
    import ray

    from branchout.orchestrator.run.fanout import submit_task
    from branchout.stages.evaluation.evaluate import evaluate_domain

    parts, lora, full = trained
    bundle = {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001}
    candidates = {"base": (str(parts[0] / "base"), None), "finetuned": (lora.model_uri, str(parts[0] / "base")),
                  "scratch": (full.model_uri, None)}
    job = eval_job(parts, candidates, "auto", use_gpu=True)
    result = submit_task(evaluate_domain, (job,), bundle, "evaluate/legal", None).result(timeout=300)
    assert set(result) == {"domain", "base_ppl", "finetuned_ppl", "scratch_ppl", "heldout_tokens", "started", "ended",
                           "precision"}
    # decided on the worker: no CUDA here, so this CPU's answer
    from branchout.core.precision import cpu_hardware, decide

    assert result["precision"] == decide("auto", cpu_hardware()).as_dict()
    assert all(result[f"{m}_ppl"] > 1 for m in ("base", "finetuned", "scratch"))

    def assigned():
        import os

        return ray.get_runtime_context().get_assigned_resources(), os.environ.get("CUDA_VISIBLE_DEVICES")

    # what that task got: the GPU and the accelerator-type share it asked for
    resources, visible = submit_task(assigned, (), bundle, "probe", None).result(timeout=60)
    assert resources["GPU"] == 1.0 and resources["accelerator_type:H100"] == pytest.approx(0.001)
    assert visible == "0"
    # and a job planned for another GPU type never lands here
    elsewhere = submit_task(assigned, (), {"CPU": 1.0, "GPU": 1.0, "accelerator_type:A100": 0.001}, "a100", None)
    time.sleep(3)
    assert not elsewhere.done()
    elsewhere.cancel()


def test_one_job_scores_every_model_as_separate_loads_would(trained):
    """Reusing the loaded base for the LoRA fine-tune changes nothing."""
    from branchout.stages.evaluation.evaluate import evaluate_domain, load_for_scoring, perplexity
    from branchout.stages.prepare.data import open_blocks

    parts, lora, full = trained
    base = str(parts[0] / "base")
    candidates = {"base": (base, None), "finetuned": (lora.model_uri, base), "scratch": (full.model_uri, None)}
    one_job = evaluate_domain(eval_job(parts, candidates, "fp32"))
    blocks = open_blocks(parts[1], "heldout")
    for name, (uri, adapter_base) in candidates.items():
        alone, tokens = perplexity(load_for_scoring(uri, adapter_base), blocks, 4, 8)
        assert one_job[f"{name}_ppl"] == pytest.approx(alone, rel=1e-6), name
        assert one_job["heldout_tokens"] == tokens
    assert one_job["finetuned_ppl"] != one_job["base_ppl"]  # the adapter was applied


@requires_native_bf16
def test_bf16_scores_are_close_to_fp32_ones(trained):
    """The models trained in fp32 here, so bf16 and fp32 scores differ by bf16 rounding only."""
    from branchout.stages.evaluation.evaluate import evaluate_domain

    parts, lora, full = trained
    base = str(parts[0] / "base")
    candidates = {"base": (base, None), "finetuned": (lora.model_uri, base), "scratch": (full.model_uri, None)}
    in_fp32 = evaluate_domain(eval_job(parts, candidates, "fp32"))
    in_bf16 = evaluate_domain(eval_job(parts, candidates, "bf16"))
    assert in_bf16["precision"]["used"] == "bf16" and in_bf16["precision"]["warning"] is None
    for name in candidates:
        assert math.isclose(in_bf16[f"{name}_ppl"], in_fp32[f"{name}_ppl"], rel_tol=0.03), name


def test_a_cross_job_runs_from_its_graph_node_and_scores_as_the_evaluation_does(trained, corpus_dir):
    """``cross/docs`` (a LoRA domain) as the driver runs it (core.graph Node.entry, a Ray task on
    the node's bundle, given a NodeJob): its adapter on the base, its scratch model, each on
    the sets its parents name. The legal data stands in for every set, so each score must
    equal the evaluation job's on that data."""
    import copy
    import importlib

    from branchout.core.graph import build_graph
    from branchout.core.spec import PipelineSpec
    from branchout.orchestrator.run.fanout import submit_task
    from branchout.stages.evaluation.evaluate import evaluate_domain
    from branchout.stages.job import NodeJob

    from conftest import TINY

    parts, lora, full = trained
    base = str(parts[0] / "base")
    raw = copy.deepcopy(TINY)
    raw["evaluate"] = {"max_blocks": 8, "batch_size": 4, "cross": True}
    raw["finetune"]["defaults"]["deepspeed"] = {"precision": "fp32"}
    spec = PipelineSpec.model_validate(raw)
    node = build_graph(spec)["cross/docs"]
    models = {"finetuned": {"model_uri": lora.model_uri}, "scratch": {"model_uri": full.model_uri},
              "base": {"model_uri": base}}
    sets = {role: {"uri": parts[1]} for role in node.parents if role.startswith("heldout:")}
    job = NodeJob(node=node, spec=spec, inputs={**models, **sets}, out_uri=str(parts[0] / "cross-docs"), run_id="t")
    module, _, function = node.entry.partition(":")
    result = submit_task(getattr(importlib.import_module(module), function), (job,), node.resources, node.name,
                         None).result(timeout=300)

    alone = evaluate_domain(eval_job(parts, {"finetuned": (lora.model_uri, base), "scratch": (full.model_uri, None)},
                                     "fp32"))
    assert set(result["ppl"]) == {"finetune/docs", "scratch/docs"}  # the base is cross/base's to score
    for model, role in (("finetune/docs", "finetuned"), ("scratch/docs", "scratch")):
        assert set(result["ppl"][model]) == {"general", "legal", "code"}
        for ppl in result["ppl"][model].values():
            assert ppl == pytest.approx(alone[f"{role}_ppl"], rel=1e-6), model
    assert result["precision"]["used"] == "fp32"
    assert result["heldout_tokens"] == {"general": alone["heldout_tokens"], "legal": alone["heldout_tokens"],
                                        "code": alone["heldout_tokens"]}
