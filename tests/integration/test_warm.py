"""The fast fan-out path is the same training: warm pool vs Ray Train, shared vs private base,
and a pool that loses a runner replaces it."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from conftest import eval_job, job_for, job_parts, local_ray

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    with local_ray("test-warm"):
        yield


@pytest.fixture(scope="module")
def parts(ray_local, corpus_dir, tmp_path_factory):
    return job_parts(tmp_path_factory.mktemp("warm"), corpus_dir)


def weights(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(path, f)))
    return out


def test_warm_pool_and_ray_train_train_the_same_weights(parts):
    import ray

    from branchout.orchestrator.run.pool import WarmPool
    from branchout.orchestrator.run.ray_train import run_distributed
    from branchout.stages.training.model import shared_base_weights

    pool = WarmPool({"CPU": 1.0}, 1, ray.put(shared_base_weights(str(parts[0] / "base"))))
    warm = job_for(parts, "warm", "full")
    pool.submit(warm).result(timeout=300)
    pool.shutdown()
    trained = job_for(parts, "raytrain", "full")
    run_distributed(trained)  # one Ray Train worker (plain torch engine: one worker, fp32)
    a, b = weights(warm.model_uri), weights(trained.model_uri)
    assert a.keys() == b.keys()
    base = weights(parts[0] / "base")
    for name in a:
        assert np.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name
        assert not np.allclose(a[name], base[name]) or name.endswith("norm.weight")  # it did train


def test_lora_on_shared_weights_is_read_only_and_identical(parts):
    import ray

    from branchout.orchestrator.run.pool import WarmPool
    from branchout.stages.training.model import shared_base_weights
    from branchout.stages.training.single_worker import run_single_worker

    original = shared_base_weights(str(parts[0] / "base"))
    ref = ray.put(original)
    pool = WarmPool({"CPU": 1.0}, 1, ref)
    shared = job_for(parts, "lora-shared", "lora")
    pool.submit(shared).result(timeout=300)
    pool.shutdown()
    private = job_for(parts, "lora-private", "lora")
    run_single_worker(private)  # loads the base from storage into private memory
    a, b = weights(shared.model_uri), weights(private.model_uri)
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for name in a:
        assert np.allclose(a[name], b[name], rtol=1e-5, atol=1e-7), name
    after = ray.get(ref)
    assert all(not v.flags.writeable for v in after.values())  # Ray maps them read-only
    assert all(np.array_equal(after[k], original[k]) for k in original)  # and nothing wrote to them


@pytest.mark.parametrize("method", ["lora", "full"])
def test_activation_checkpointing_trains_the_same_weights(parts, method):
    from branchout.stages.prepare.tokenizer import load_tokenizer
    from branchout.stages.training.model import prepare_model
    from branchout.stages.training.single_worker import run_single_worker

    plain, ckpt = job_for(parts, f"{method}-plain", method), job_for(parts, f"{method}-ckpt", method,
                                                                      activation_checkpointing=True)
    tok = load_tokenizer(str(parts[0] / "tokenizer"))
    on = prepare_model(ckpt, tok)
    on = on.get_base_model() if method == "lora" else on
    off = prepare_model(plain, tok)
    flag = "is_activation_checkpointing" if hasattr(off, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(on, flag) and not getattr(off, flag)
    run_single_worker(plain)
    run_single_worker(ckpt)
    a, b = weights(plain.model_uri), weights(ckpt.model_uri)
    assert a.keys() == b.keys()
    for name in a:
        assert np.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name


def test_a_dead_runner_is_replaced_and_the_job_can_be_retried(parts):
    import ray
    from ray.exceptions import RayActorError

    from branchout.orchestrator.run.pool import WarmPool

    pool = WarmPool({"CPU": 1.0}, 1)
    runner = pool._idle[0]
    pid = ray.get(runner.ready.remote())
    doomed = pool.submit(job_for(parts, "doomed", "full", steps=400))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(RayActorError):
        doomed.result(timeout=120)
    assert pool.replaced == 1
    retried = pool.submit(job_for(parts, "doomed", "full"))  # what the fan-out's retry does
    assert retried.result(timeout=300)["pool_pid"] != pid
    pool.shutdown()


def test_idle_runners_give_their_resources_back(parts):
    import ray

    from branchout.orchestrator.run.pool import WarmPool

    pool = WarmPool({"CPU": 1.0}, 2, linger_s=1.0)
    for future in [pool.submit(job_for(parts, f"brief{i}", "full", steps=2)) for i in range(2)]:
        future.result(timeout=300)

    @ray.remote(num_cpus=2)
    def needs_both_cpus():  # a job of another shape, e.g. a 2-worker fine-tune
        return "placed"

    # the runners held both CPUs for the pool's life once; this waited forever
    assert ray.get(needs_both_cpus.remote(), timeout=120) == "placed"
    assert pool.retired == 2
    again = pool.submit(job_for(parts, "after-retirement", "full", steps=2))  # a cold runner takes it
    assert again.result(timeout=300)["steps"] == 2
    pool.shutdown()


def test_shutdown_leaves_no_linger_timer_holding_a_runner(parts):
    """A linger timer that outlived the pool dropped its runner's handle while the driver's
    ray.shutdown() ran; Ray then ended the driver with exit code 1 and a run that succeeded
    was a failed Ray job (CI, test_s3). Shutdown cancels and joins every timer."""
    import threading

    from branchout.orchestrator.run.pool import WarmPool

    pool = WarmPool({"CPU": 1.0}, 1, linger_s=600.0)
    pool.submit(job_for(parts, "lingers", "full", steps=2)).result(timeout=300)
    lingering = [t for t in threading.enumerate() if isinstance(t, threading.Timer)]
    assert lingering, "the idle runner should linger before giving its CPU back"
    pool.shutdown()
    assert not [t for t in lingering if t.is_alive()]
    assert not pool._timers


def test_shutdown_with_jobs_running_and_queued_returns_and_fails_them(parts):
    import time

    import ray
    from ray.exceptions import RayActorError

    from branchout.orchestrator.run.pool import WarmPool

    pool = WarmPool({"CPU": 1.0}, 1)
    ray.get(pool._idle[0].ready.remote())
    running = pool.submit(job_for(parts, "long", "full", steps=10_000))
    queued = pool.submit(job_for(parts, "never", "full"))
    metrics = parts[0] / "logs" / "finetune-long.metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and '"loss"' in metrics.read_text()):  # it is training, not starting
        assert time.monotonic() < deadline and not running.done(), "the long job never trained a step"
        time.sleep(0.1)
    started = time.monotonic()
    pool.shutdown()  # once deadlocked: ray.kill under the lock the killed job's callback needs
    assert time.monotonic() - started < 30
    with pytest.raises(RayActorError):
        running.result(timeout=60)
    with pytest.raises(RuntimeError, match="shut down before this job started"):
        queued.result(timeout=5)
    assert pool.replaced == 0  # a runner killed by shutdown is not replaced
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(job_for(parts, "late", "full"))


def test_a_16_bit_shared_base_is_used_in_place_or_copied_to_fp32(parts, tmp_path):
    """GPU pools get the base in the training precision: half the object store and transfer.
    numpy has no bfloat16, so it travels as raw 16 bits and is viewed back without a copy."""
    import torch

    from branchout.orchestrator.run.pool import shared_base_dtype
    from branchout.stages.prepare.tokenizer import load_tokenizer
    from branchout.stages.training.model import export_model, model_on_weights, shared_base_weights

    assert shared_base_dtype({"CPU": 2, "GPU": 0.5}, "bf16") == "bfloat16"
    assert shared_base_dtype({"CPU": 2}, "bf16") == "float32"  # CPU LoRA computes on the arrays in place
    assert shared_base_dtype({"CPU": 2, "GPU": 1}, "fp32") == "float32"
    tok = load_tokenizer(str(parts[0] / "tokenizer"))
    fp32 = shared_base_weights(str(parts[0] / "base"))
    bf16 = shared_base_weights(str(parts[0] / "base"), "bfloat16")
    assert all(v.dtype == np.uint16 and v.nbytes * 2 == fp32[k].nbytes for k, v in bf16.items())
    for v in bf16.values():
        v.flags.writeable = False  # as Ray maps them
    lora = model_on_weights(job_for(parts, "bf16-lora", "lora"), tok, bf16, copy=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    param = dict(lora.named_parameters())[name]
    assert param.dtype == torch.bfloat16 and not param.requires_grad
    assert param.data_ptr() == bf16[name].ctypes.data  # a view of the shared pages, no copy
    full = model_on_weights(job_for(parts, "bf16-full", "full"), tok, bf16, copy=True)
    param = dict(full.named_parameters())[name]
    assert param.dtype == torch.float32 and param.requires_grad
    assert torch.equal(param.detach(), torch.from_numpy(fp32[name]).bfloat16().float())
    # a bf16 export round-trips through the same path
    export_model(full, tok, str(tmp_path / "bf16-base"), dtype=torch.bfloat16)
    again = shared_base_weights(str(tmp_path / "bf16-base"), "bfloat16")
    assert all(np.array_equal(again[k], bf16[k]) for k in bf16 if k in again)


def test_an_evaluation_runs_on_the_runner_that_trained_and_scores_as_a_cold_task(parts):
    """Evaluations follow the fan-out onto its warm runners (torch, transformers and the model
    classes already imported): same process, and the same numbers as a task of its own."""
    from branchout.orchestrator.run.fanout import submit_task
    from branchout.orchestrator.run.pool import WarmPool
    from branchout.stages.evaluation.evaluate import evaluate_domain

    pool = WarmPool({"CPU": 1.0}, 1)
    job = job_for(parts, "then-scored", "full")
    trained = pool.submit(job).result(timeout=300)
    candidates = {"base": (str(parts[0] / "base"), None), "finetuned": (job.model_uri, None)}
    args = (eval_job(parts, candidates, "fp32"),)
    warm = pool.submit_call(evaluate_domain, args, "evaluate/legal", None).result(timeout=300)
    pool.shutdown()
    assert warm["pool_pid"] == trained["pool_pid"]  # submitted within the linger: the same runner
    cold = submit_task(evaluate_domain, args, {"CPU": 1.0}, "evaluate/legal", None).result(timeout=300)
    for key in ("base_ppl", "finetuned_ppl", "heldout_tokens"):
        assert warm[key] == cold[key], key
    assert warm["finetuned_ppl"] != warm["base_ppl"]
