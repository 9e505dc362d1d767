"""The memory planner against DeepSpeed's estimators, the ZeRO paper, and hand arithmetic."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from branchout.cluster.gpu_memory import (
    GB,
    ZeroOption,
    activation_bytes,
    model_states,
    paper_model_states,
    pick,
    plan_memory,
    usable_bytes,
)
from branchout.orchestrator.cli import app
from branchout.orchestrator.config.loader import load_spec
from branchout.orchestrator.config.plan import model_shape

from conftest import REPO

LLAMA2_7B = 6_738_415_616
LLAMA2_7B_EMBEDDING = 32_000 * 4096


def test_zero_paper_worked_example():
    # ZeRO paper, Figure 1: 7.5B parameters on 64 GPUs, mixed-precision Adam (K = 12)
    gb = [paper_model_states(int(7.5e9), 64, stage) / GB for stage in range(4)]
    assert gb == pytest.approx([120, 31.4, 16.6, 1.9], rel=0.02)


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_model_states_match_deepspeed_estimators(gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as z3
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as z2

    p, largest = LLAMA2_7B, LLAMA2_7B_EMBEDDING
    ours = lambda *o: int(model_states(ZeroOption(*o), p, largest, gpus))  # noqa: E731
    assert ours(2) == z2(p, gpus, 1, cpu_offload=False)[1]
    assert ours(2, True) == z2(p, gpus, 1, cpu_offload=True)[1]
    assert ours(3) == z3(p, largest, gpus, 1, cpu_offload=False)[1]
    assert ours(3, True) == z3(p, largest, gpus, 1, cpu_offload=True, cpu_offload_params=False)[1]
    assert ours(3, True, True) == z3(p, largest, gpus, 1, cpu_offload=True, cpu_offload_params=True)[1]


def test_llama_shapes_from_the_examples():
    seven = model_shape(load_spec(REPO / "examples" / "llama-7b.yaml"))
    assert seven.params == LLAMA2_7B and seven.largest_layer == LLAMA2_7B_EMBEDDING
    one = model_shape(load_spec(REPO / "examples" / "llama-1b.yaml"))
    # TinyLlama dims: 2 × 32000×2048 embeddings + 22 × (2×2048² + 2×2048×256 + 3×2048×5632 + 2×2048) + 2048
    assert one.params == 2 * 32_000 * 2048 + 22 * (2 * 2048**2 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048) + 2048


def test_picks_match_hand_arithmetic_on_h100():
    budget = 80e9 * 0.9 - 2**30  # usable bytes of an 80 GB GPU
    assert usable_bytes(80) == budget
    # 7B, 8 × H100, micro-batch 1 × 4096 tokens, bf16
    p = LLAMA2_7B
    acts = 34 * 4096 * 1 * 4096 * 32 + 6 * 4096 * 1 * 32_000
    assert activation_bytes(4096, 1, 4096, 32, 32_000) == acts
    # checkpointing keeps each layer's input and one layer's full set: a fraction of the total
    assert activation_bytes(4096, 1, 4096, 32, 32_000, checkpointed=True) < acts / 4
    zero0 = 20 * p + acts  # 2 + 2 + 16 bytes per parameter, nothing sharded
    zero1 = 4 * p + 16 * p / 8 + acts  # fp32 state sharded over 8 GPUs
    assert zero0 > budget and zero1 < budget
    seven = plan_memory(p, LLAMA2_7B_EMBEDDING, 8, 8, 4096, 1, 4096, 32, 32_000, 80)
    assert pick(seven).option == ZeroOption(1) and pick(seven).total == pytest.approx(zero1)
    # 1.1B, 8 × H100, micro-batch 4 × 2048: everything replicated still fits
    p1 = 1_100_048_384
    zero0_1b = 20 * p1 + 34 * 2048 * 4 * 2048 * 22 + 6 * 2048 * 4 * 32_000
    one = plan_memory(p1, 32_000 * 2048, 8, 8, 2048, 4, 2048, 22, 32_000, 80)
    assert zero0_1b < budget and pick(one).option == ZeroOption(0)
    assert pick(one).total == pytest.approx(zero0_1b)
    # the same 7B on one 24 GB L4 at micro-batch 1 × 512: only the 16-bit weights fit on the
    # GPU, so the optimizer state goes to the host (ZeRO-2 + offload: 2 bytes/parameter)
    l4_budget = 24e9 * 0.9 - 2**30
    l4_acts = 34 * 512 * 4096 * 32 + 6 * 512 * 32_000
    assert 20 * p > l4_budget and 2 * p + l4_acts < l4_budget
    l4 = plan_memory(p, LLAMA2_7B_EMBEDDING, 1, 1, 512, 1, 4096, 32, 32_000, 24)
    assert pick(l4).option == ZeroOption(2, True) and pick(l4).total == pytest.approx(2 * p + l4_acts)


def test_auto_stage_is_resolved_and_reported():
    spec = load_spec(REPO / "examples" / "llama-7b.yaml")
    assert spec.pretrain.deepspeed.zero_stage == 1
    assert spec.notes == ["pretrain.deepspeed.zero_stage: auto → ZeRO-1 (59.5 of 70.9 GB usable per GPU)",
                          # its LoRA domains share half an H100 each: a farm there holds 3 of them
                          "finetune.farm: 0.5 × H100-80GB holds 3 LoRA member(s) of an adapter farm (the base once, "
                          "13.5 GB; 5.84 GB a member): farms of at most that many"]


@pytest.mark.parametrize("example,gpu,picked", [
    ("quickstart.yaml", "H100-80GB", "ZeRO-0"),
    ("llama-1b.yaml", "H100-80GB", "ZeRO-0"),
    ("llama-7b.yaml", "H100-80GB", "ZeRO-1"),
    ("llama-7b.yaml", "L4-24GB", "ZeRO-3+offload(opt,params)"),
])
def test_plan_command(example, gpu, picked):
    result = CliRunner().invoke(app, ["plan", str(REPO / "examples" / example), "--gpu", gpu])
    assert result.exit_code == 0, result.output
    assert f"pick: {picked}" in result.stdout
    for label in ("ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3+offload(opt,params)"):
        assert label in result.stdout


def test_plan_command_bad_gpu():
    result = CliRunner().invoke(app, ["plan", str(REPO / "examples" / "quickstart.yaml"), "--gpu", "H900"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown GPU 'H900'; known: T4-16GB")


def test_fractional_packing_is_refused_when_it_cannot_fit():
    from branchout.orchestrator.config.loader import SpecError

    path = REPO / "examples" / "llama-7b.yaml"
    spec = load_spec(path)  # two LoRA jobs per H100: 2 × (13.5 GB base + activations) fits
    assert spec.finetune.domains[0].resources_per_worker.gpu == 0.5
    with pytest.raises(SpecError) as info:
        load_spec(path, ["finetune.defaults.resources_per_worker.gpu=0.25"])
    # 4 × (2 bytes × 6.74B base + 16 bytes × 1% adapters + activations of 1 × 1024 tokens)
    per_job = 2 * LLAMA2_7B + 16 * (LLAMA2_7B // 100) + 34 * 1024 * 4096 * 32 + 6 * 1024 * 32_000
    assert info.value.problems[0] == (
        f"finetune.domains.0.resources_per_worker.gpu: 0.25 packs 4 jobs per GPU, 4 × {per_job / GB:.1f} GB > "
        "70.9 GB usable on H100-80GB (finetune/legal); give each job more of a GPU or less memory "
        "(micro_batch_size, seq_len, method: lora)")
    assert len(info.value.problems) == 3  # one line per domain


def test_plan_lists_every_job_with_its_resources():
    from branchout.orchestrator.config.plan import build_plan

    one = build_plan(load_spec(REPO / "examples" / "llama-1b.yaml"))
    h100 = {"CPU": 4.0, "GPU": 1.0, "accelerator_type:H100": 0.001}
    assert [(j.name, j.resources) for j in one.jobs] == [
        ("finetune/legal", h100), ("scratch/legal", h100), ("finetune/code", h100), ("scratch/code", h100),
        ("evaluate/legal", h100), ("evaluate/code", h100)]
    assert one.fanout_jobs == 4
    # a from-scratch baseline trains every weight: fp32 weights, gradients, Adam (16 B) + bf16 casts (2 B)
    p1 = one.params
    acts = 34 * 2048 * 8 * 2048 * 22 + 6 * 2048 * 8 * 32_000
    assert one.job("scratch/legal").memory_bytes == pytest.approx(18 * p1 + acts)
    # evaluation holds one model at a time, in bf16, and one batch of inference activations
    assert one.job("evaluate/legal").memory_bytes == pytest.approx(
        2 * p1 + 34 * 2048 * 8 * 2048 + 6 * 2048 * 8 * 32_000)
    seven = build_plan(load_spec(REPO / "examples" / "llama-7b.yaml"))
    assert [j.name for j in seven.jobs if j.kind == "scratch"] == []  # the example scores base and fine-tune


def test_scratch_baselines_that_cannot_fit_are_refused_in_one_line():
    result = CliRunner().invoke(app, ["validate", str(REPO / "examples" / "llama-7b.yaml"),
                                      "--set", "evaluate.models=[base,finetuned,scratch]"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    # 18 B/parameter of training state for one worker of a 6.74B model, against half an H100
    assert lines[0].startswith(f"error: {REPO / 'examples' / 'llama-7b.yaml'}: evaluate.models: 'scratch' trains "
                               "the 6.74B-parameter model from scratch")
    assert "126.1 GB per job > 35.5 GB it can have (legal, code, medicine)" in lines[0]


def test_plan_command_lists_scratch_and_evaluation_jobs():
    result = CliRunner().invoke(app, ["plan", str(REPO / "examples" / "llama-1b.yaml"), "--gpu", "H100-80GB"])
    assert result.exit_code == 0, result.output
    for job in ("finetune/legal", "scratch/legal", "evaluate/legal", "scratch/code", "evaluate/code"):
        assert job in result.stdout
    assert "fan-out (4 jobs at once), then evaluation" in result.stdout


def test_every_gpu_job_asks_ray_for_its_accelerator_type():
    from branchout.cluster.autoscale import stage_bundles
    from branchout.core.graph import build_graph

    bundles = stage_bundles(build_graph(load_spec(REPO / "examples" / "llama-7b.yaml")))
    for stage in ("pretrain", "fanout", "evaluate"):
        assert bundles[stage] and all(b.get("accelerator_type:H100") == 0.001 for b in bundles[stage]), stage
    cpu = build_graph(load_spec(REPO / "examples" / "quickstart.yaml"))
    assert all(set(b) == {"CPU"} for stage in stage_bundles(cpu).values() for b in stage)
