"""Distributed training on Ray Train workers with DeepSpeed: pretrain and multi-worker fine-tunes.

``train_worker`` is Ray Train's ``train_loop_per_worker``. Ray Train has already set up
the process group (gloo on CPU, NCCL on GPU); DeepSpeed joins it. Checkpoints go
through ``ray.train.report`` so Ray Train owns retention and restart: after a worker
dies, every worker restarts and resumes from ``ray.train.get_checkpoint()`` with model,
optimizer, scheduler, RNG and data position (= step) restored.

At the end every rank takes part in gathering the full weights (ZeRO-3 shards them) and
rank 0 exports a consolidated HF model directory with the tokenizer.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict

from branchout.stages.job import TrainJob


def train_worker(config: dict) -> None:
    import ray.train
    import torch

    from branchout.stages import storage
    from branchout.stages.checkpoint import fetch_verified
    from branchout.stages.data import open_blocks
    from branchout.stages.engine import DeepSpeedEngine
    from branchout.stages.loop import rng_state, run_steps, set_rng_state
    from branchout.stages.metrics import MetricsLogger
    from branchout.stages.model import export_model, prepare_model
    from branchout.stages.tokenizer import load_tokenizer

    job = TrainJob(**config["job"])
    t = job.spec()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(t.resources_per_worker.cpu)))

    tokenizer = load_tokenizer(fetch_verified(job.tokenizer_uri))
    model = prepare_model(job, tokenizer)
    engine = DeepSpeedEngine(model, t, job.steps, world, t.resources_per_worker.uses_gpu)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            client_state = engine.load(path)
        start_step = int(client_state.get("step", 0))
        set_rng_state(client_state.get("rng"))

    logger = MetricsLogger(job.name, job.logs_uri, job.hub_name, job.steps) if rank == 0 else None
    if logger:
        logger.state("running", resumed_from=start_step, workers=world, pid=os.getpid())
    blocks = open_blocks(job.data_uri, "train")

    def save_checkpoint(step: int, loss: float) -> None:
        with tempfile.TemporaryDirectory(prefix="branchout-ckpt-") as path:
            engine.save(path, {"step": step, "rng": rng_state()})
            ray.train.report({"step": step, "loss": loss},
                             checkpoint=ray.train.Checkpoint.from_directory(path))

    result = run_steps(engine, blocks, t, job.steps, start_step, rank, world, logger, save_checkpoint)

    weights = engine.state_dict_for_export()  # collective: every rank must call it
    if rank == 0:
        export_model(prepare_model(job, tokenizer), tokenizer, job.model_uri, state_dict=weights,
                     extra={"job": job.name, "steps": job.steps})
        storage.write_text(storage.join(job.out_uri, "result.json"), json.dumps(asdict(result)))
        logger.close()


def read_result(job: TrainJob) -> dict | None:
    from branchout.stages import storage

    uri = storage.join(job.out_uri, "result.json")
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None
