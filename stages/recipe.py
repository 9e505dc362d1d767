"""The training recipe, one for every training job: pretrain, fine-tunes and baselines,
on one worker or many.

``train`` decides the precision on the workers' hardware, builds the model and its engine
(DeepSpeed where ``TrainingSpec.uses_deepspeed``, else plain torch), resumes from the newest
good checkpoint, runs the loop (``stages.loop``), exports the model and writes the job's
``result.json``. What differs between one process and a Ray Train worker group is only
where a step's checkpoint goes and where a resumed job finds it, a ``CheckpointSink``:

- ``stages.single_worker.PublishedCheckpoints``: one process publishes ``checkpoints/step_N``
  (fan-out jobs, on warm runners or as Ray tasks);
- ``stages.distributed.RayTrainCheckpoints``: every rank writes its shards and a manifest,
  and ``ray.train.report`` uploads them (pretrain, multi-worker fine-tunes).

Every rank runs ``train``; rank 0 alone logs, exports and writes the result.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from functools import partial
from typing import Any, Protocol

from branchout.stages.job import TrainJob


class CheckpointSink(Protocol):
    def resume(self, engine, logger) -> dict[str, Any] | None:
        """Load the newest good checkpoint into ``engine``; its client state, or None."""

    def save(self, engine, step: int, loss: float) -> None:
        """Make step ``step``'s checkpoint durable (and apply retention)."""


def train(job: TrainJob, sink: CheckpointSink, rank: int = 0, world: int = 1, shared_base: dict | None = None,
          tokenizer=None) -> dict[str, Any]:
    """Train ``job`` to completion and export it; returns the result (every rank) that rank 0
    also writes to ``<job>/result.json``.

    ``shared_base``: the parent's weights from Ray's object store (warm runners); ``tokenizer``:
    one already loaded. Both only save time; the result is the same without them.
    """
    import torch

    from branchout.stages import storage
    from branchout.stages.checkpoint import fetch_verified
    from branchout.stages.data import open_blocks
    from branchout.stages.engine import (
        DeepSpeedEngine,
        TorchEngine,
        decide_precision,
        training_dtype,
    )
    from branchout.stages.faults import killer
    from branchout.stages.instruct import open_roles, with_chat_template
    from branchout.stages.loop import run_steps, set_rng_state
    from branchout.stages.metrics import MetricsLogger
    from branchout.stages.model import export_model, prepare_model, zero3_config
    from branchout.stages.tokenizer import load_tokenizer

    started = time.time()
    use_gpu = job.spec().resources_per_worker.uses_gpu and torch.cuda.is_available()
    job, precision = decide_precision(job, use_gpu, world)  # `auto` decided here, the same on every rank
    t = job.spec()
    torch.set_num_threads(max(1, int(t.resources_per_worker.cpu)))

    tokenizer = tokenizer or load_tokenizer(fetch_verified(job.tokenizer_uri))
    if t.uses_deepspeed():
        # ZeRO-3: built in shards, never whole on any rank
        model = prepare_model(job, tokenizer, zero3_config=zero3_config(job, tokenizer, world, use_gpu))
        engine = DeepSpeedEngine(model, t, job.steps, world, use_gpu)
    else:
        model = prepare_model(job, tokenizer, shared_base)  # a baseline (scratch) ignores the parent
        engine = TorchEngine(model, t, job.steps, device="cuda" if use_gpu else "cpu")

    logger = MetricsLogger(job.name, job.logs_uri, job.hub_name, job.steps, job.tracking) if rank == 0 else None
    client_state = sink.resume(engine, logger)
    start_step = int(client_state.get("step", 0)) if client_state else 0
    if client_state:
        set_rng_state(client_state.get("rng"))
    if logger:
        # after the resume point is known: a restarted worker group's new rank 0 says where it resumed
        logger.state("running", resumed_from=start_step, workers=world, pid=os.getpid(), started=started,
                     precision=precision.as_dict())
        if precision.warning:
            print(f"[branchout] {job.name}: {precision.warning}", flush=True)
    blocks = open_blocks(job.data_uri, "train")
    roles = open_roles(job.data_uri, "train")
    if roles is not None:  # instruction data: the model is saved with the template it learned
        tokenizer = with_chat_template(tokenizer)

    result = run_steps(engine, blocks, t, job.steps, start_step, rank, world, logger, partial(sink.save, engine),
                       after_step=killer(job.name, job.out_uri, rank), roles=roles)

    weights = None
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
        # Checkpoints stay until the driver has recorded this job as succeeded (it removes
        # them then): a worker that outlived its driver must not leave a resumed attempt
        # nothing to resume from.
    out = {**asdict(result), "started": started, "ended": time.time(), "model_uri": job.model_uri,
           "pid": os.getpid(), "workers": world, "precision": precision.as_dict()}
    if rank == 0:
        storage.write_text(storage.join(job.out_uri, "result.json"), json.dumps(out))
        logger.state("succeeded", ended=out["ended"])
        logger.close()
    return out


def read_result(job: TrainJob) -> dict | None:
    """The ``result.json`` rank 0 wrote, or None if the job has not finished."""
    from branchout.stages import storage

    uri = storage.join(job.out_uri, "result.json")
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None
