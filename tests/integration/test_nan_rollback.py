"""``training.nan_rollbacks``: a non-finite loss rolls the job back to its last checkpoint,
skips the batches it had read since and lowers the learning rate, and the run finishes;
the rollback is in the result (the report's warnings) and in every later checkpoint, so a
resumed job keeps the skipped data and the lowered rate. The NaN is real: a planned fault
(``BRANCHOUT_FAULTS=pretrain@6:nan``) sets weights to NaN before step 6, so every later loss
is NaN until the weights are restored."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys

import pytest

from conftest import TINY, job_parts

STEPS = 12


@pytest.fixture(scope="module")
def parts(corpus_dir, tmp_path_factory):
    return job_parts(tmp_path_factory.mktemp("nan"), corpus_dir)


def _job(parts, out: str, engine: str, rollbacks: int = 2):
    from branchout.core.spec import PretrainSpec
    from branchout.stages.job import TrainJob

    root, data_uri, overrides = parts
    t = PretrainSpec(dataset={"path": "unused"}, steps=STEPS, seq_len=32, global_batch_size=4, micro_batch_size=2,
                     checkpoint_every=4, log_every=2, keep_checkpoints=5, optimizer={"lr": 3e-3},
                     schedule={"warmup_steps": 2}, nan_rollbacks=rollbacks, nan_lr_factor=0.5,
                     deepspeed={"precision": "fp32", "engine": engine, "zero_stage": 2})
    return TrainJob(name="pretrain", kind="pretrain", training=t, steps=STEPS, model_type="llama",
                    model_overrides=TINY["model"]["config"], tokenizer_uri=str(root / "tokenizer"),
                    data_uri=data_uri, out_uri=str(root / out), logs_uri=str(root / "logs"), run_id="test")


def _train(job) -> subprocess.CompletedProcess:
    """``train(job)`` in a process of its own (DeepSpeed starts its one-rank group there)."""
    from raycluster import free_port

    path = f"{job.out_uri}.job.pkl"
    with open(path, "wb") as f:
        pickle.dump(job, f)
    script = ("import pickle, sys; from branchout.stages.training.recipe import train; "
              "train(pickle.load(open(sys.argv[1], 'rb')))")
    env = {**os.environ, "BRANCHOUT_FAULTS": "pretrain@6:nan", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    return subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("engine", ["auto", "deepspeed"])  # auto: the plain engine of a one-worker job
def test_a_nan_is_rolled_back_and_the_run_finishes(parts, engine):
    import torch
    from safetensors.torch import load_file

    from branchout.stages.training.ds_files import safe_load

    job = _job(parts, f"rolled-{engine}", engine)
    done = _train(job)
    assert done.returncode == 0, done.stderr[-3000:]
    # the NaN made at step 6 is read at step 6 (a log step): back to the step-4 checkpoint
    line = ("loss non-finite in steps 5-6: rolled back to step 4, skipping the batches of steps 5-6, "
            "learning rate × 0.5 (rollback 1 of at most 2)")
    assert f"[branchout] pretrain: {line}" in done.stdout
    with open(os.path.join(job.out_uri, "result.json")) as f:
        result = json.load(f)
    assert result["rollbacks"] == [line] and result["steps"] == STEPS and math.isfinite(result["final_loss"])
    weights = load_file(os.path.join(job.model_uri, "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # a checkpoint written after the rollback carries it: a resumed job reads past the skipped
    # batches at the lowered rate
    ckpt = os.path.join(job.checkpoints_uri, "step_00000008")
    if engine == "auto":
        state = safe_load(os.path.join(ckpt, "state.pt"))
        client, base_lrs = state["client_state"], state["scheduler"]["base_lrs"]
    else:
        (name,) = [n for n in os.listdir(os.path.join(ckpt, "state")) if n.startswith("mp_rank")]
        saved = safe_load(os.path.join(ckpt, "state", name))
        client, base_lrs = saved, saved["lr_scheduler"]["base_lrs"]
    assert client["data_skip"] == 2 and client["rollbacks"] == [line]
    assert base_lrs == [pytest.approx(1.5e-3)] * len(base_lrs)


def test_without_rollbacks_the_nan_fails_the_job_naming_the_setting(parts):
    job = _job(parts, "no-rollback", "auto", rollbacks=0)
    done = _train(job)
    assert done.returncode != 0
    assert "NonFiniteLoss: loss is nan in steps 5-6; lower the learning rate (0 rollback(s) spent; " \
           "training.nan_rollbacks: 0)" in done.stderr
