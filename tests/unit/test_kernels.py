"""The GPU speed switches are decided on the worker from the spec, the device and the job's
length; the memory planner sizes micro-batches; saved models load without the Hub's kernels."""

from __future__ import annotations

import pytest

from branchout.core.spec import PretrainSpec
from branchout.stages.training.kernels import COMPILE_MIN_STEPS, decide, liger_installed


def spec(**fields) -> PretrainSpec:
    return PretrainSpec(dataset={"path": "unused"}, steps=10, **fields)


@pytest.mark.parametrize(("device", "deepspeed", "steps", "fused", "compiled"), [
    ("cpu", False, 10_000, False, False),  # CPUs keep what they were measured with
    ("cuda", False, COMPILE_MIN_STEPS, True, True),  # a long job on a GPU: both on
    ("cuda:1", False, COMPILE_MIN_STEPS - 1, True, False),  # too short to repay the compile
    ("cuda", True, 10_000, True, False),  # DeepSpeed compiles only when asked
])
def test_auto_switches_follow_the_device_engine_and_job_length(device, deepspeed, steps, fused, compiled):
    k = decide(spec(), steps, device, deepspeed)
    assert (k.fused_optimizer, k.compile, k.liger) == (fused, compiled, False)


def test_explicit_switches_are_obeyed_on_any_device():
    k = decide(spec(compile=True, optimizer={"fused": True}), 3, "cpu", deepspeed=True)
    assert (k.fused_optimizer, k.compile) == (True, True)
    k = decide(spec(compile=False, optimizer={"fused": False}), 10_000, "cuda", deepspeed=False)
    assert (k.fused_optimizer, k.compile) == (False, False)


@pytest.mark.skipif(liger_installed(), reason="liger-kernel is installed here")
def test_liger_asked_for_but_missing_fails_naming_the_setting():
    with pytest.raises(RuntimeError, match="fused_kernels: true.*liger-kernel"):
        decide(spec(fused_kernels=True), 10, "cuda", deepspeed=False)


def test_the_switches_are_validated_fields():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="compile"):
        spec(compile="sometimes")
    with pytest.raises(ValidationError, match="fused"):
        spec(optimizer={"fused": "maybe"})


def test_the_planner_picks_the_largest_micro_batch_that_fits():
    from branchout.cluster.gpu_memory import (
        ZeroOption,
        activation_bytes,
        largest_micro_batch,
        model_states,
        usable_bytes,
    )

    shape = dict(params=171_000_000, largest_layer=8_400_000, gpus=1, seq_len=1024, hidden=1024, layers=12,
                 vocab=8192)
    # an H200 holds all 32 blocks of a step at once; a 16 GB card fewer, and each pick fits
    assert largest_micro_batch(ZeroOption(0), per_worker_batch=32, gpu_memory_gb=141, **shape) == 32
    small = largest_micro_batch(ZeroOption(0), per_worker_batch=32, gpu_memory_gb=16, **shape)
    assert small is not None and 1 <= small < 32 and 32 % small == 0
    states = model_states(ZeroOption(0), shape["params"], shape["largest_layer"], 1)
    acts = {m: activation_bytes(1024, m, 1024, 12, 8192) for m in (small, small * 2)}
    assert states + acts[small] <= usable_bytes(16) < states + acts[small * 2]
    assert largest_micro_batch(ZeroOption(0), per_worker_batch=32, gpu_memory_gb=2, **shape) is None


def test_saved_models_load_without_the_hubs_kernels(tmp_path):
    """transformers turns on Hub kernels by default when the `kernels` package is installed,
    and fetches them at the model's first train(): a worker without Hub access then fails."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from branchout.stages.training.model import load_causal_lm

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = load_causal_lm(str(tmp_path))
    model.train()
    assert model.use_kernels is False
    try:
        import kernels  # noqa: F401
    except ImportError:
        return
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path)).use_kernels is True  # what the loader prevents


def test_the_plan_notes_a_micro_batch_smaller_than_what_fits():
    from pathlib import Path

    from branchout.orchestrator.config.loader import load_spec

    spec = load_spec(str(Path(__file__).resolve().parents[2] / "examples" / "llama-1b.yaml"))
    notes = [n for n in spec.notes if "micro_batch_size" in n]
    assert notes == ["pretrain.micro_batch_size: 4 of 32 blocks per worker per step; 8 fit 80 GB GPUs by the "
                     "planner's estimate (larger micro-batches fill a GPU better)"]
