"""The training recipe, one for every training job: pretrain, fine-tunes and baselines,
on one worker or many.

``train`` decides the precision on the workers' hardware, builds the model and its engine
(DeepSpeed where ``TrainingSpec.uses_deepspeed``, else plain torch), resumes from the newest
good checkpoint, runs the loop (``stages.training.loop``), exports the model and writes the job's
``result.json``. It runs as one process (``stages.training.single_worker``: fan-out jobs on warm
runners or as Ray tasks) or on every rank of a Ray Train worker group
(``stages.training.distributed``: the pretrain, multi-worker fine-tunes); both keep their
checkpoints the same way (``Checkpoints``).

Every rank runs ``train``; rank 0 alone logs, exports and writes the result.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from functools import partial
from typing import Any

from branchout.stages.job import TrainJob
from branchout.stages.training.checkpoints import Checkpoints


def train(job: TrainJob, rank: int = 0, world: int = 1, shared_base: dict | None = None,
          tokenizer=None, preemption=None) -> dict[str, Any]:
    """Train ``job`` to completion and export it; returns the result (every rank) that rank 0
    also writes to ``<job>/result.json``.

    ``shared_base``: the parent's weights from Ray's object store (warm runners); ``tokenizer``:
    one already loaded. Both only save time; the result is the same without them.
    ``preemption``: asked on report steps whether a node of the job is being preempted
    (``stages.training.loop.run_steps``); on a notice the step is checkpointed, rank 0 writes
    ``<job>/preempted.json`` instead of a result, and the caller starts the job again elsewhere
    (``orchestrator.run.ray_train``).
    """
    import torch

    from branchout import storage
    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.prepare.instruct import open_roles, with_chat_template
    from branchout.stages.prepare.tokenizer import load_tokenizer
    from branchout.stages.training.engine import (
        DeepSpeedEngine,
        TorchEngine,
        decide_precision,
        training_dtype,
    )
    from branchout.stages.training.faults import held, killer, poisoner
    from branchout.stages.training.loop import NonFiniteLoss, run_steps, set_rng_state
    from branchout.stages.training.metrics import MetricsLogger
    from branchout.stages.training.mixture import MixedBlocks
    from branchout.stages.training.model import export_model, prepare_model, zero3_config
    from branchout.stages.training.probes import Prober
    from branchout.stages.training.validation import Selection
    from branchout.storage.checkpoint import fetch_verified

    started = time.time()
    use_gpu = job.spec().resources_per_worker.uses_gpu and torch.cuda.is_available()
    job, precision = decide_precision(job, use_gpu, world)  # `auto` decided here, the same on every rank
    t = job.spec()
    torch.set_num_threads(max(1, int(t.resources_per_worker.cpu)))

    tokenizer = tokenizer or load_tokenizer(fetch_verified(job.tokenizer_uri))
    # One worker trains with the plain engine unless its job resumes a DeepSpeed checkpoint
    # (written by more workers): that engine can reshard it, the plain one cannot read it.
    deepspeed = t.uses_deepspeed() or (world == 1 and Checkpoints(job).newest_is_deepspeed())
    if deepspeed:
        # ZeRO-3: built in shards, never whole on any rank
        model = prepare_model(job, tokenizer, zero3_config=zero3_config(job, tokenizer, world, use_gpu))
        engine = DeepSpeedEngine(model, t, job.steps, world, use_gpu)
    else:
        model = prepare_model(job, tokenizer, shared_base)  # a baseline (scratch) ignores the parent
        engine = TorchEngine(model, t, job.steps, device="cuda" if use_gpu else "cpu")

    logger = MetricsLogger(job.name, job.logs_uri, job.hub_name, job.steps, job.tracking) if rank == 0 else None
    if logger and deepspeed and not t.uses_deepspeed():
        logger.warn("its checkpoints are DeepSpeed's: this one-worker attempt trains with DeepSpeed to resume them")
    # what the held-out scores decide (fine-tunes: keep_best, early_stop) rides in every checkpoint
    selection = Selection.of(t) if t.eval_every and job.kind != "pretrain" else None
    sink = Checkpoints(job, rank, world, engine.device, final=deepspeed, selection=selection)
    client_state = sink.resume(engine, logger)
    start_step = int(client_state.get("step", 0)) if client_state else 0
    if client_state:
        set_rng_state(client_state.get("rng"))
        if selection is not None:
            selection.load(client_state.get("selection"))
        if client_state.get("early") and hasattr(engine, "early"):
            engine.early.stop_at, engine.early.end = client_state["early"]["stop_at"], client_state["early"]["end"]
    if logger:
        # after the resume point is known: a restarted worker group's new rank 0 says where it resumed
        logger.state("running", resumed_from=start_step, workers=world, pid=os.getpid(), started=started,
                     precision=precision.as_dict(), kernels=engine.kernels.as_dict())
        if precision.warning:
            print(f"[branchout] {job.name}: {precision.warning}", flush=True)
    if job.mixture:  # a pretraining mixture: its sources interleaved by weight (stages.training.mixture)
        blocks = MixedBlocks([open_blocks(uri, "train") for _, uri, _ in job.mixture], [w for _, _, w in job.mixture])
    elif job.replay:  # a fine-tune replaying the pretraining text: the domain's blocks first
        shares = [1 - sum(w for _, _, w in job.replay), *(w for _, _, w in job.replay)]
        blocks = MixedBlocks([open_blocks(job.data_uri, "train"), *(open_blocks(uri, "train") for _, uri, _ in job.replay)],
                             shares)
    else:
        blocks = open_blocks(job.data_uri, "train")
    roles = open_roles(job.data_uri, "train")
    if roles is not None:  # instruction data: the model is saved with the template it learned
        tokenizer = with_chat_template(tokenizer)

    scorer = heldout_scorer(job, t, rank, world) if t.eval_every else None
    prober = Prober(job, rank, world, train) if job.kind == "pretrain" and job.probes else None
    if client_state:  # what earlier NaN rollbacks decided: the data position runs ahead, and they are reported
        sink.data_skip, sink.rollbacks = int(client_state.get("data_skip", 0)), list(client_state.get("rollbacks", []))
    if preemption is not None:  # a node drain, or a SIGTERM to any rank (stages.training.sigterm)
        preemption = partial(notice, preemption, engine.device, world)
    poison = poisoner(job.name, job.out_uri) if rank == 0 else None  # only rank 0: one marker, no race
    hold = held(job.name, preemption)

    def before_step(step: int) -> None:
        if poison is not None and poison(step + 1):
            engine.poison()
        if hold is not None:
            hold(step)

    first_step = start_step
    while True:
        try:
            result = run_steps(engine, blocks, t, job.steps, start_step, rank, world, logger,
                               partial(sink.save, engine), after_step=killer(job.name, job.out_uri, rank),
                               roles=roles, scorer=scorer, selection=selection, prober=prober,
                               data_skip=sink.data_skip, before_step=before_step, preemption=preemption)
            break
        except NonFiniteLoss as e:  # every rank raises it at the same step
            start_step = roll_back(job, t, engine, sink, e, rank, logger)
    result.first_step = first_step  # where this attempt began, rollbacks or not
    if result.preempted:
        return preempted(job, result, rank, logger)
    if selection is not None and selection.keep_best and selection.best_step not in (None, result.steps):
        sink.load(engine, selection.best_step)  # keep_best: the best scored step's weights are exported
    mixture_read = _summed(blocks.read, engine.device, world) if job.mixture or job.replay else None

    weights = None
    if deepspeed and job.export:
        engine.release_optimizer_state()  # the last checkpoint holds them; the export needs the room
        weights = engine.state_dict_for_export()  # collective under ZeRO-3: every rank must call it
    if rank == 0 and job.export:
        job.check_lease()
        extra = {"job": job.name, "steps": job.steps}
        if deepspeed:
            # DeepSpeed's 16-bit weights as they are; the module only lends names and config
            export_model(engine.module, tokenizer, job.model_uri, state_dict=weights, extra=extra)
        else:
            export_model(engine.model, tokenizer, job.model_uri, extra=extra,
                         dtype=training_dtype(t.deepspeed.precision))
        # Checkpoints stay until the driver has recorded this job as succeeded (it removes
        # them then): a worker that outlived its driver must not leave a resumed attempt
        # nothing to resume from.
    out = {**asdict(result), "started": started, "ended": time.time(), "model_uri": job.model_uri if job.export else None,
           "pid": os.getpid(), "workers": world, "precision": precision.as_dict(),
           "kernels": engine.kernels.as_dict()}
    if sink.rollbacks:
        out["rollbacks"] = sink.rollbacks
    if use_gpu:  # what the job took of its GPU at most: for sizing micro-batches and packing
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if prober is not None:
        out.update(prober.outputs(result.steps))
    if selection is not None:
        out.update(selection.outputs(), exported_step=selection.best_step if selection.keep_best and
                   selection.best_step is not None else result.steps)
    if job.mixture or job.replay:  # the blocks this attempt's workers read of each source, as trained
        names = [name for name, _, _ in job.mixture] or [job.name, *(name for name, _, _ in job.replay)]
        out["mixture_blocks"] = dict(zip(names, mixture_read, strict=True))
    if rank == 0:
        if job.export:
            storage.write_text(storage.join(job.out_uri, "result.json"), json.dumps(out))
        logger.state("succeeded", ended=out["ended"])
        logger.close()
    return out


def preempted(job: TrainJob, result, rank: int, logger) -> dict[str, Any]:
    """End this attempt on a preemption notice: its step is checkpointed (``run_steps``); rank 0
    says so in ``<job>/preempted.json``, which the launcher reads to start the job again."""
    import json

    from branchout import storage

    out = {"preempted": True, "step": result.steps, "first_step": result.first_step, "at": time.time(),
           "pid": os.getpid()}
    if rank == 0:
        storage.write_text(storage.join(job.out_uri, "preempted.json"), json.dumps(out))
        logger.state("preempted", preempted_at=result.steps)  # the driver says so, not "worker died"
        print(f"[branchout] {job.name}: preemption notice: checkpointed step {result.steps}; this attempt ends "
              "so the job continues on the nodes that remain, from that step", flush=True)
        logger.close()
    return out


def notice(drain, device, world: int) -> bool:
    """Whether this attempt should checkpoint and end: ``drain()`` (Ray's preemption notice,
    asked on every rank alike) or a SIGTERM any rank received. One MAX all-reduce on the
    engine's device (a CPU tensor fails under NCCL); every rank calls it on the same steps."""
    import torch
    import torch.distributed as dist

    from branchout.stages.training import sigterm

    drained = bool(drain())
    flag = torch.tensor(int(drained or sigterm.requested()), dtype=torch.int32, device=device)
    if world > 1 and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def roll_back(job: TrainJob, t, engine, sink: Checkpoints, error, rank: int, logger) -> int:
    """Undo a non-finite loss (``training.nan_rollbacks``): load the newest checkpoint (written
    before the bad window was read: the check runs before a step's checkpoint), move the data
    position past the batches of the steps undone, scale the learning rate by
    ``nan_lr_factor``. Returns the step to go on from.

    Raises:
        NonFiniteLoss: ``error`` again, when the rollbacks are spent or nothing was checkpointed.
    """
    step = sink.newest_step()
    if len(sink.rollbacks) >= t.nan_rollbacks or step is None:
        why = "no checkpoint to roll back to" if step is None else f"{len(sink.rollbacks)} rollback(s) spent"
        raise type(error)(f"{error} ({why}; training.nan_rollbacks: {t.nan_rollbacks})", error.first,
                          error.last) from error
    from branchout.stages.training.loop import set_rng_state

    state = sink.load(engine, step)
    set_rng_state(state.get("rng"))
    skipped = error.last - step
    engine.scale_lr(t.nan_lr_factor)
    # In memory, not the checkpoint's: a second rollback to the same checkpoint skips past
    # both bad stretches, and counts toward the same bound.
    sink.data_skip += skipped
    line = (f"loss non-finite in steps {error.first}-{error.last}: rolled back to step {step}, skipping the "
            f"batches of steps {step + 1}-{error.last}, learning rate × {t.nan_lr_factor:g} "
            f"(rollback {len(sink.rollbacks) + 1} of at most {t.nan_rollbacks})")
    sink.rollbacks = [*sink.rollbacks, line]
    if rank == 0:
        print(f"[branchout] {job.name}: {line}", flush=True)
        if logger:
            logger.state("running", rollbacks=sink.rollbacks)
    return step


def read_result(job: TrainJob) -> dict | None:
    """The ``result.json`` rank 0 wrote, or None if the job has not finished."""
    from branchout import storage

    uri = storage.join(job.out_uri, "result.json")
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def _summed(counts, device, world: int) -> list[int]:
    """Per-rank counts summed over the ranks (a collective on the engine's device: every rank calls it)."""
    import torch
    import torch.distributed as dist

    total = torch.as_tensor(counts, dtype=torch.int64, device=device)
    if world > 1 and dist.is_initialized():
        dist.all_reduce(total)
    return [int(n) for n in total.tolist()]


def heldout_scorer(job: TrainJob, t, rank: int, world: int):
    """``eval_every``'s scorer: the held-out side of the job's data (each source's for a mixture)."""
    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.prepare.instruct import open_roles
    from branchout.stages.training.validation import HeldoutScorer

    sources = [(name.split("/", 1)[-1], uri, w) for name, uri, w in job.mixture] or [("heldout", job.data_uri, 1.0)]
    sets = {name: (open_blocks(uri, "heldout"), open_roles(uri, "heldout")) for name, uri, _ in sources}
    return HeldoutScorer(sets, {name: w for name, _, w in sources}, t.eval_blocks, t.micro_batch_size, rank, world)
