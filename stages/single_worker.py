"""A single-worker fine-tune (or from-scratch baseline) as one Ray task.

Fan-out jobs are small and many, so they skip Ray Train and DeepSpeed start-up: one
process, the plain torch engine, checkpoints published under the job's directory with a
manifest. A retried job resumes from its newest checkpoint that verifies.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict

from branchout.stages.job import TrainJob


def run_single_worker(job: TrainJob, shared_base: dict | None = None, tokenizer=None) -> dict:
    """Train ``job`` to completion and export it; returns a result dict for the driver.

    ``shared_base``: the parent's weights from Ray's object store (warm pool); ``tokenizer``:
    an already loaded tokenizer. Both only save time; the result is the same without them.
    """
    import torch

    from branchout.stages import storage
    from branchout.stages.checkpoint import (
        CorruptCheckpointError,
        fetch_verified,
        newest_good,
        publish_dir,
        retain,
    )
    from branchout.stages.data import open_blocks
    from branchout.stages.engine import TorchEngine, decide_precision, training_dtype
    from branchout.stages.faults import killer
    from branchout.stages.instruct import open_roles, with_chat_template
    from branchout.stages.loop import rng_state, run_steps, set_rng_state
    from branchout.stages.metrics import MetricsLogger
    from branchout.stages.model import export_model, prepare_model
    from branchout.stages.tokenizer import load_tokenizer

    started = time.time()
    use_gpu = job.spec().resources_per_worker.uses_gpu and torch.cuda.is_available()
    job, precision = decide_precision(job, use_gpu)  # `auto` decided on this worker's hardware
    t = job.spec()
    torch.set_num_threads(max(1, int(t.resources_per_worker.cpu)))
    device = "cuda" if use_gpu else "cpu"
    logger = MetricsLogger(job.name, job.logs_uri, job.hub_name, job.steps, job.tracking)
    logger.state("running", started=started, precision=precision.as_dict())
    if precision.warning:
        print(f"[branchout] {job.name}: {precision.warning}", flush=True)

    tokenizer = tokenizer or load_tokenizer(fetch_verified(job.tokenizer_uri))
    model = prepare_model(job, tokenizer, shared_base)  # a baseline (scratch) ignores the parent
    engine = TorchEngine(model, t, job.steps, device=device)

    start_step = 0
    names = _checkpoint_names(job)
    name, path, skipped = newest_good(job.checkpoints_uri, names)
    if skipped:
        logger.state("running", checkpoint_warnings=skipped)
    for line in skipped:
        print(f"[branchout] skipping damaged checkpoint: {line}", flush=True)
    if names and name is None:
        raise CorruptCheckpointError(job.checkpoints_uri, ["no checkpoint verifies: " + " | ".join(skipped)])
    if path is not None:
        client_state = engine.load(path)
        start_step = int(client_state["step"])
        set_rng_state(client_state.get("rng"))

    blocks = open_blocks(job.data_uri, "train")
    roles = open_roles(job.data_uri, "train")
    if roles is not None:  # instruction data: the model is saved with the template it learned
        tokenizer = with_chat_template(tokenizer)

    def save_checkpoint(step: int, loss: float) -> None:
        if step == job.steps:
            return  # the exported model is the final state; no need to resume past it
        with tempfile.TemporaryDirectory(prefix="branchout-ckpt-") as path:
            engine.save(path, {"step": step, "rng": rng_state()})
            job.check_lease()
            publish_dir(path, storage.join(job.checkpoints_uri, f"step_{step:08d}"))
        retain(job.checkpoints_uri, _checkpoint_names(job), t.keep_checkpoints)

    result = run_steps(engine, blocks, t, job.steps, start_step, 0, 1, logger, save_checkpoint,
                       after_step=killer(job.name, job.out_uri, 0), roles=roles)
    job.check_lease()
    export_model(engine.model, tokenizer, job.model_uri, extra={"job": job.name, "steps": job.steps},
                 dtype=training_dtype(t.deepspeed.precision))
    # Checkpoints stay until the driver has recorded this job as succeeded (it removes
    # them then): a worker that outlived its driver must not leave a resumed attempt
    # nothing to resume from.
    ended = time.time()
    out = {**asdict(result), "started": started, "ended": ended, "model_uri": job.model_uri,
           "pid": os.getpid(), "precision": precision.as_dict()}
    storage.write_text(storage.join(job.out_uri, "result.json"), json.dumps(out))
    logger.state("succeeded", ended=ended)
    logger.close()
    return out


def _checkpoint_names(job: TrainJob) -> list[str]:
    from branchout.stages import storage

    return [n for n in storage.listdir(job.checkpoints_uri) if n.startswith("step_")]
