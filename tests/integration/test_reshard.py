"""A pretrain checkpointed by N workers resumes on M (issue 31), for every ZeRO stage: a
2-worker run is stopped at step 40 (checkpoint_every 20) and continues on 1 worker; that
1-worker run is stopped at step 42 and continues on 2. Each continuation loses what the
uninterrupted 2-worker run lost at the same steps, within 1e-4 relative. The same global
batch is read at every step whatever the worker count (``stages.training.batches``), so
the only difference left is the order of float sums.

Each rank is a process of its own started as a launcher would (RANK, WORLD_SIZE,
MASTER_ADDR), running the recipe every Ray Train worker runs (``recipe.train``); DeepSpeed's
process group is gloo's, as on a CPU cluster. The one-worker continuation asks for no
engine (``engine: auto`` would pick the plain torch engine for one worker): it keeps
DeepSpeed because its checkpoint is DeepSpeed's.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest

from conftest import job_parts

STEPS, STOP, STOP_ONE = 44, 40, 42


@pytest.fixture(scope="module")
def parts(corpus_dir, tmp_path_factory):
    return job_parts(tmp_path_factory.mktemp("reshard"), corpus_dir)


def _job(parts, out: str, stage: int, workers: int, engine: str = "deepspeed", checkpoint_every: int = 20):
    from branchout.core.spec import PretrainSpec
    from branchout.stages.job import TrainJob

    root, data_uri, overrides = parts
    t = PretrainSpec(dataset={"path": "unused"}, steps=STEPS, seq_len=32, global_batch_size=4, micro_batch_size=2,
                     num_workers=workers, checkpoint_every=checkpoint_every, log_every=1, keep_checkpoints=3,
                     optimizer={"lr": 3e-3}, schedule={"warmup_steps": 4},
                     deepspeed={"precision": "fp32", "engine": engine, "zero_stage": stage})
    return TrainJob(name="pretrain", kind="pretrain", training=t, steps=STEPS, model_type="llama",
                    model_overrides=overrides, tokenizer_uri=str(root / "tokenizer"), data_uri=data_uri,
                    out_uri=str(root / out), logs_uri=str(root / out / "logs"), run_id="test")


def _train(jobs: list, world: int) -> str:
    """``train(job)`` for each of ``jobs`` in turn, on ``world`` ranks, one process each (a
    launch costs seconds of imports and group set-up; the jobs share it); returns rank 0's output."""
    from raycluster import free_port

    path = f"{jobs[0].out_uri}.jobs.pkl"
    with open(path, "wb") as f:
        pickle.dump(jobs, f)
    # Once every job's results are written the ranks meet, close the group and skip the
    # interpreter's teardown: gloo's threads left to it can abort a rank after its work is
    # done (as tests/integration/test_gpu_paths.py's ranks do).
    script = ("import os, pickle, sys; import torch.distributed as dist; from branchout.stages.training.recipe import train\n"
              "for job in pickle.load(open(sys.argv[1], 'rb')):\n"
              "    print('=== job', job.out_uri, flush=True)\n"
              "    train(job, int(sys.argv[2]), int(sys.argv[3]))\n"
              "dist.barrier(); dist.destroy_process_group(); sys.stdout.flush(); os._exit(0)")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", script, path, str(rank), str(world)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
                                   "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"})
             for rank in range(world)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        said = "\n".join(x for x in out.splitlines() if "Warning" not in x and "return func(" not in x)
        assert p.returncode == 0, f"rank {rank} of {world} exited {p.returncode}:\n{said[-4000:]}"
    return outputs[0]


def _said(output: str, job) -> str:
    """What rank 0 printed while it trained ``job`` (``_train`` marks where each job begins)."""
    return output.split(f"=== job {job.out_uri}\n", 1)[1].split("=== job ", 1)[0]


def _losses(job) -> dict[int, float]:
    with open(os.path.join(job.logs_uri, "pretrain.metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _resumed_from(parts, done, out: str, stop: int, **job):
    """A job whose checkpoints are ``done``'s up to step ``stop``: ``done`` was stopped there."""
    resumed = _job(parts, out, **job)
    src = done.checkpoints_uri
    for name in sorted(os.listdir(src)):
        if name.startswith("step_") and int(name.removeprefix("step_")) <= stop:
            shutil.copytree(os.path.join(src, name), os.path.join(resumed.checkpoints_uri, name))
    return resumed


def _continues(job, world: int, stop: int, expected: dict[int, float]) -> None:
    """``job``, trained on ``world`` workers, went on from ``stop`` and lost what ``expected`` says."""
    with open(os.path.join(job.out_uri, "result.json")) as f:
        result = json.load(f)
    assert result["first_step"] == stop and result["workers"] == world and result["steps"] == STEPS
    got = _losses(job)
    assert sorted(got) == list(range(stop + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, world)
    # nothing of the conversion is left beside the checkpoints
    assert not [n for n in os.listdir(job.checkpoints_uri) if n.startswith("universal-")]


STAGES = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def runs(parts):
    """Per ZeRO stage: (uninterrupted 2-worker job, 2 → 1 job, 1 → 2 job, rank 0's output of each
    continuation). Three launches in all, every stage's job in each."""
    whole = [_job(parts, f"whole-{stage}", stage, 2) for stage in STAGES]
    _train(whole, 2)
    one = [_resumed_from(parts, w, f"one-{stage}", STOP, stage=stage, workers=1, engine="auto", checkpoint_every=2)
           for stage, w in zip(STAGES, whole, strict=True)]
    out_one = _train(one, 1)
    two = [_resumed_from(parts, o, f"two-{stage}", STOP_ONE, stage=stage, workers=2)
           for stage, o in zip(STAGES, one, strict=True)]
    out_two = _train(two, 2)
    return {stage: (whole[i], one[i], two[i], _said(out_one, one[i]), _said(out_two, two[i]))
            for i, stage in enumerate(STAGES)}


@pytest.mark.parametrize("stage", STAGES)
def test_a_checkpoint_resumes_on_another_worker_count_and_trains_on_as_before(runs, stage):
    whole, one, two, out_one, out_two = runs[stage]
    expected = _losses(whole)
    assert sorted(expected) == list(range(1, STEPS + 1))
    _continues(one, 1, STOP, expected)
    assert "its checkpoints are DeepSpeed's: this one-worker attempt trains with DeepSpeed" in out_one
    _continues(two, 2, STOP_ONE, expected)
    for before, after, printed in ((2, 1, out_one), (1, 2, out_two)):
        # ZeRO (1-3) partitions the optimizer: joined and cut again; stage 0 in fp32 keeps it whole
        assert (f"written by {before} worker(s); resharding it for {after}" in printed) == (stage > 0), printed[-2000:]
