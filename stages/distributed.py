"""Distributed training on Ray Train workers with DeepSpeed: pretrain and multi-worker fine-tunes.

``train_worker`` is Ray Train's ``train_loop_per_worker``. Ray Train has already set up
the process group (gloo on CPU, NCCL on GPU); DeepSpeed joins it. Checkpoints go
through ``ray.train.report`` and Ray Train restarts the worker group after a worker dies
(``max_failures``). Every rank writes a manifest of its own shards after writing them;
a checkpoint is good when all ranks' manifests are there and every file verifies.

On (re)start, rank 0 picks the newest *good* checkpoint in the job's Ray Train storage,
falling back past damaged ones and saying why, and every rank loads it: model,
optimizer, scheduler, RNG and data position (= step). This covers both a restart inside
one Ray Train run and a new run of the same job (``branchout resume``). Rank 0 also applies retention:
the newest ``keep_checkpoints`` good checkpoints stay, the newest good one always.

Under ZeRO-3 the model is built (or the parent loaded) already partitioned, under
``deepspeed.zero.Init``. At the end every rank takes part in DeepSpeed's layer-by-layer
16-bit consolidation onto rank 0, which writes it, in the training dtype, as a sharded
safetensors HF model directory with the tokenizer. A single worker
without offload has nothing for DeepSpeed to do and trains with the plain torch
engine (``TrainingSpec.uses_deepspeed``). ``precision: auto`` is decided first, on the
workers' hardware (``stages.engine.decide_precision``), and recorded in the job's result.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict

from branchout.stages.job import TrainJob


def train_worker(config: dict) -> None:
    import ray.train
    import torch

    from branchout.stages import storage
    from branchout.stages.checkpoint import fetch_verified, write_rank_manifest
    from branchout.stages.data import open_blocks
    from branchout.stages.engine import (
        DeepSpeedEngine,
        TorchEngine,
        decide_precision,
        training_dtype,
    )
    from branchout.stages.faults import killer
    from branchout.stages.instruct import open_roles, with_chat_template
    from branchout.stages.loop import rng_state, run_steps, set_rng_state
    from branchout.stages.metrics import MetricsLogger
    from branchout.stages.model import export_model, prepare_model, zero3_config
    from branchout.stages.tokenizer import load_tokenizer

    job: TrainJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = job.spec().resources_per_worker.uses_gpu and torch.cuda.is_available()
    job, precision = decide_precision(job, use_gpu, world)  # `auto` decided here, the same on every rank
    t = job.spec()
    torch.set_num_threads(max(1, int(t.resources_per_worker.cpu)))

    tokenizer = load_tokenizer(fetch_verified(job.tokenizer_uri))
    if t.uses_deepspeed():
        # ZeRO-3: built in shards, never whole on any rank
        model = prepare_model(job, tokenizer, zero3_config=zero3_config(job, tokenizer, world, use_gpu))
        engine = DeepSpeedEngine(model, t, job.steps, world, use_gpu)
    else:
        model = prepare_model(job, tokenizer)
        engine = TorchEngine(model, t, job.steps, device="cuda" if use_gpu else "cpu")

    logger = MetricsLogger(job.name, job.logs_uri, job.hub_name, job.steps, job.tracking) if rank == 0 else None
    start_step = 0
    chosen = _choose_checkpoint(job, rank, world, logger)
    if chosen is not None:
        uri = storage.join(ray_checkpoints_uri(job), chosen)
        with tempfile.TemporaryDirectory(prefix="branchout-load-") as tmp:
            # Rank 0 has verified it. On shared disk every rank reads it in place; from an
            # object store each rank downloads it, verifying what it downloaded.
            path = storage.local_path(uri) if storage.is_local(uri) else fetch_verified(uri, tmp, world=world)
            client_state = engine.load(path)
        start_step = int(client_state.get("step", 0))
        set_rng_state(client_state.get("rng"))
    if logger:
        logger.state("running", resumed_from=start_step, workers=world, pid=os.getpid(), started=time.time(),
                     precision=precision.as_dict())
        if precision.warning:
            print(f"[branchout] {job.name}: {precision.warning}", flush=True)
    blocks = open_blocks(job.data_uri, "train")
    roles = open_roles(job.data_uri, "train")
    if roles is not None:  # instruction data: the model is saved with the template it learned
        tokenizer = with_chat_template(tokenizer)

    def save_checkpoint(step: int, loss: float) -> None:
        with tempfile.TemporaryDirectory(prefix="branchout-ckpt-") as path:
            engine.save(path, {"step": step, "rng": rng_state()})
            write_rank_manifest(path, rank, world, {"step": step, "job": job.name})
            job.check_lease()
            ray.train.report({"step": step, "loss": loss},
                             checkpoint=ray.train.Checkpoint.from_directory(path))
        _retain_together(job, t.keep_checkpoints, rank, world, engine.device)

    result = run_steps(engine, blocks, t, job.steps, start_step, rank, world, logger, save_checkpoint,
                       after_step=killer(job.name, job.out_uri, rank), roles=roles)

    if t.uses_deepspeed():
        engine.release_optimizer_state()  # the last checkpoint holds them; the export needs the room
    weights = engine.state_dict_for_export()  # collective under ZeRO-3: every rank must call it
    if rank == 0:
        job.check_lease()
        extra = {"job": job.name, "steps": job.steps}
        if t.uses_deepspeed():
            # DeepSpeed's 16-bit weights as they are; the module only lends names and config
            export_model(engine.module, tokenizer, job.model_uri, state_dict=weights, extra=extra)
        else:
            export_model(engine.model, tokenizer, job.model_uri, extra=extra,
                         dtype=training_dtype(t.deepspeed.precision))
        storage.write_text(storage.join(job.out_uri, "result.json"),
                           json.dumps({**asdict(result), "precision": precision.as_dict()}))
        logger.close()


_RAY_CHECKPOINT = re.compile(r"^checkpoint_\d{4}-\d{2}-\d{2}_")


def ray_checkpoints_uri(job: TrainJob) -> str:
    """Where this job's Ray Train runs keep their checkpoints: ``<job>/ray/<run name>/``."""
    from branchout.stages import storage

    return storage.join(job.out_uri, "ray")


def _checkpoint_dirs(job: TrainJob) -> list[str]:
    """Every checkpoint of every Ray Train run of this job, oldest first, as ``run/checkpoint_…``.

    Each launch is a new Ray Train run (see ``orchestrator.run.training``), so a resumed job
    finds its checkpoints under earlier runs' names. Ray names them checkpoint_<timestamp>
    (name order is age order); its own bookkeeping (checkpoint_manager_snapshot.json)
    shares the prefix and is skipped.
    """
    from branchout.stages import storage

    root = ray_checkpoints_uri(job)
    found = [(ckpt, f"{run}/{ckpt}") for run in storage.listdir(root) if run.startswith("train")
             for ckpt in storage.listdir(storage.join(root, run)) if _RAY_CHECKPOINT.match(ckpt)]
    return [path for _, path in sorted(found)]


def _retain_together(job: TrainJob, keep: int, rank: int, world: int, device) -> list[str]:
    """Retention for a sharded checkpoint set: every rank verifies (SHA-256) only its own
    shards of each candidate, newest first, and a candidate is good when every rank's
    verdict is (an all-reduce MIN per candidate, on the engine's device: CUDA under NCCL);
    rank 0 deletes. No process reads the whole checkpoint, which for a large model on an
    object store would mean downloading all of it at every save."""
    import torch
    import torch.distributed as dist

    from branchout.stages.checkpoint import rank_problems, retain

    root = ray_checkpoints_uri(job)
    if not (dist.is_initialized() and world > 1):
        return retain(root, _checkpoint_dirs(job), keep, world) if rank == 0 else []
    listing = [_checkpoint_dirs(job) if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)  # every rank walks the same list

    def agreed(uri: str) -> bool:
        verdict = torch.tensor(0 if rank_problems(uri, rank, world) else 1, dtype=torch.int32, device=device)
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
        return bool(verdict.item())

    return retain(root, listing[0], keep, world, verify=agreed, delete=rank == 0)


def _choose_checkpoint(job: TrainJob, rank: int, world: int, logger) -> str | None:
    """Rank 0 verifies and chooses; every rank gets the same answer (a broadcast).

    Raises:
        CorruptCheckpointError: checkpoints exist but none verifies (never silently restart
            a long pretrain from step 0).
    """
    import torch.distributed as dist

    from branchout.stages.checkpoint import CorruptCheckpointError, newest_good

    choice: list = [None, []]
    if rank == 0:
        names = _checkpoint_dirs(job)
        if names:
            with tempfile.TemporaryDirectory(prefix="branchout-verify-") as tmp:
                name, _, skipped = newest_good(ray_checkpoints_uri(job), names, world, local_dir=tmp)
            choice = [name, skipped]
            if name is None:
                choice = ["", skipped]
    if dist.is_initialized() and world > 1:
        # pickled into a tensor on the current CUDA device under NCCL (Ray Train made this
        # worker's GPU current), on the CPU under gloo
        dist.broadcast_object_list(choice, src=0)
    name, skipped = choice
    if logger and skipped:
        logger.state("running", checkpoint_warnings=skipped)
    for line in skipped:
        print(f"[branchout] skipping damaged checkpoint: {line}", flush=True)
    if name == "":
        raise CorruptCheckpointError(ray_checkpoints_uri(job), ["no checkpoint verifies: " + " | ".join(skipped)])
    return name


def read_result(job: TrainJob) -> dict | None:
    from branchout.stages import storage

    uri = storage.join(job.out_uri, "result.json")
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None
