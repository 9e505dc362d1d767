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
import tempfile
import time
from dataclasses import asdict
from functools import partial
from typing import Any

from branchout.stages.job import TrainJob


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
    if deepspeed:
        engine.release_optimizer_state()  # the last checkpoint holds them; the export needs the room
        weights = engine.state_dict_for_export()  # collective under ZeRO-3: every rank must call it
    if rank == 0:
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
    out = {**asdict(result), "started": started, "ended": time.time(), "model_uri": job.model_uri,
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


class ReshardError(RuntimeError):
    """A checkpoint this job's engine cannot load on its number of workers."""


class Checkpoints:
    """A training job's checkpoints, one layout for one process and for a worker group:
    ``<job>/checkpoints/step_<N>/`` (zero-padded: name order is step order), into which
    every rank writes its own files and then a manifest of them (``MANIFEST.rank<r>.json``).
    A checkpoint is good when all ``world`` manifests are there and every file verifies.

    On (re)start rank 0 picks the newest good checkpoint, falling back past damaged ones
    and saying why, and every rank loads it: model, optimizer, scheduler, RNG and data
    position (= step). This covers a retried fan-out job, a restart inside one Ray Train
    run and a new run of the same job (``branchout resume``). After each save the newest
    ``keep_checkpoints`` good ones stay (the newest good one always): every rank verifies
    only its own files, the ranks agree by an all-reduce, rank 0 deletes; no process reads
    the whole checkpoint, which for a large model on an object store would mean
    downloading all of it at every save.

    ``final``: the last step is checkpointed too. DeepSpeed releases its optimizer state
    before the export gathers the weights, and a failed export resumes from there; the
    plain torch engine exports straight from memory.
    """

    def __init__(self, job: TrainJob, rank: int = 0, world: int = 1, device: Any = "cpu", final: bool = False,
                 selection=None):
        self.job, self.rank, self.world, self.device, self.final = job, rank, world, device, final
        self.selection = selection  # stages.training.validation.Selection: saved with each checkpoint
        self.data_skip = 0  # steps of data NaN rollbacks skipped: the data position is step + data_skip
        self.rollbacks: list[str] = []  # what each NaN rollback did, for the report

    @property
    def uri(self) -> str:
        return self.job.checkpoints_uri

    def names(self) -> list[str]:
        from branchout import storage

        return sorted(n for n in storage.listdir(self.uri) if n.startswith("step_"))

    def resume(self, engine, logger) -> dict[str, Any] | None:
        """Load the newest good checkpoint into ``engine``; its client state, or None.

        Raises:
            CorruptCheckpointError: checkpoints exist but none verifies (never silently
                restart a long job from step 0).
        """
        from branchout import storage
        from branchout.storage.checkpoint import CorruptCheckpointError, newest_good, written_world

        with tempfile.TemporaryDirectory(prefix="branchout-load-") as tmp:
            # name ("" when none verifies), skipped, rank 0's verified copy, how many ranks wrote it
            choice: list = [None, [], None, self.world]
            if self.rank == 0:
                names = self.names()
                if names:
                    name, path, skipped = newest_good(self.uri, names, self.world, local_dir=tmp, any_world=True)
                    written = written_world(storage.join(self.uri, name)) if name else None
                    choice = [name or "", skipped, path, written or self.world]
            self._broadcast(choice)
            name, skipped, path, written = choice
            if logger and skipped:
                logger.state("running", checkpoint_warnings=skipped)
            for line in skipped if self.rank == 0 else []:
                print(f"[branchout] skipping damaged checkpoint: {line}", flush=True)
            if name == "":
                raise CorruptCheckpointError(self.uri, ["no checkpoint verifies: " + " | ".join(skipped)])
            if name is None:
                return None
            return self._load(engine, name, path, written, tmp, logger)

    def _load(self, engine, name: str, path: str | None, written: int, tmp: str, logger=None) -> dict[str, Any]:
        """Every rank loads checkpoint ``name``, written by ``written`` ranks, that rank 0 has
        verified (its copy: ``path``); returns its client state. Written by another number of
        workers, it is resharded (``stages.training.reshard``)."""
        from branchout import storage
        from branchout.stages.training.engine import TAG
        from branchout.stages.training.reshard import partitioned
        from branchout.storage.checkpoint import fetch_verified

        uri = storage.join(self.uri, name)
        plan = [None]
        if self.rank == 0:
            plan = ["as is" if written == self.world else
                    "torch" if not os.path.isdir(os.path.join(path, TAG)) else  # the plain engine's state.pt
                    "reshard" if partitioned(path) else "as is"]  # stage 0 in fp32: the optimizer is whole
        self._broadcast(plan)
        if plan[0] == "torch":
            raise ReshardError(f"{self.job.name}: checkpoint {name} was written by the plain torch engine (one worker, "
                               f"engine: auto), which this {self.world}-worker DeepSpeed job cannot read: resume it on "
                               "1 worker, or set deepspeed.engine: deepspeed for a pretrain that may change its "
                               "worker count")
        if plan[0] == "as is":
            if self.rank != 0:  # rank 0 verified it: shared disk is read in place, an object store downloaded
                path = storage.local_path(uri) if storage.is_local(uri) else fetch_verified(uri, tmp, written)
            return engine.load(path)
        return self._load_resharded(engine, name, path, written, tmp, logger)

    def _load_resharded(self, engine, name: str, path: str | None, written: int, tmp: str, logger) -> dict[str, Any]:
        """Rank 0 joins the ``written`` ranks' partitions into DeepSpeed's universal checkpoint
        and publishes it beside the checkpoints; every rank loads its own partitions of it;
        the copy goes once all have."""
        from branchout import storage
        from branchout.stages.training.reshard import to_universal
        from branchout.storage.checkpoint import fetch_verified, publish_dir

        if not hasattr(engine, "load_universal"):  # train() keeps DeepSpeed for DeepSpeed's checkpoints
            raise ReshardError(f"{self.job.name}: checkpoint {name} is DeepSpeed's and this job trains with the plain "
                               "torch engine")
        universal_uri = storage.join(self.uri, f"universal-{name}")  # not step_*: never taken for a checkpoint
        local = None
        if self.rank == 0:
            line = (f"checkpoint {name} was written by {written} worker(s); resharding it for {self.world} "
                    "(DeepSpeed universal checkpoint)")
            if logger is not None:  # the driver says it and keeps it with the job
                logger.warn(line)
            else:
                print(f"[branchout] {self.job.name}: {line}", flush=True)
            for stale in storage.listdir(self.uri):  # left by an attempt that died resharding
                if stale.startswith("universal-"):
                    storage.remove_dir(storage.join(self.uri, stale))
            local = to_universal(path, os.path.join(tmp, "universal"))
            publish_dir(local, universal_uri, {"job": self.job.name, "from_world": written})
        self._barrier()
        if self.rank != 0:
            local = (storage.local_path(universal_uri) if storage.is_local(universal_uri)
                     else fetch_verified(universal_uri, os.path.join(tmp, "universal")))
        state = engine.load_universal(local)
        self._barrier()
        if self.rank == 0:
            storage.remove_dir(universal_uri)
        return state

    def save(self, engine, step: int, loss: float) -> None:
        """Make step ``step``'s checkpoint durable, then apply retention."""
        from branchout import storage
        from branchout.stages.training.loop import rng_state
        from branchout.storage.checkpoint import upload_rank, write_rank_manifest

        if step == self.job.steps and not self.final:
            return  # the exported model is the final state
        uri = storage.join(self.uri, _step_name(step))
        if self.rank == 0 and storage.exists(uri):
            storage.remove_dir(uri)  # left by an attempt that died writing it: never mix two attempts' files
        self._barrier()
        with tempfile.TemporaryDirectory(prefix="branchout-ckpt-") as path:
            state = {"step": step, "rng": rng_state(), "data_skip": self.data_skip, "rollbacks": self.rollbacks}
            if self.selection is not None:
                state["selection"] = self.selection.state()
            early = getattr(engine, "early", None)
            if early is not None and early.end is not None:  # pretrain.stop decided: where it ends
                state["early"] = {"stop_at": early.stop_at, "end": early.end}
            engine.save(path, state)
            write_rank_manifest(path, self.rank, self.world, {"step": step, "job": self.job.name})
            self.job.check_lease()
            upload_rank(path, uri, self.rank)
        self._barrier()  # every rank's files are there before anyone judges the set
        self._retain()

    def _retain(self) -> list[str]:
        import torch

        from branchout.storage.checkpoint import rank_problems, retain

        keep = self.job.spec().keep_checkpoints
        listing = [self.names() if self.rank == 0 else None]
        self._broadcast(listing)  # every rank walks the same list

        def agreed(uri: str) -> bool:
            verdict = torch.tensor(0 if rank_problems(uri, self.rank, self.world) else 1, dtype=torch.int32,
                                   device=self.device)
            if self._distributed():
                import torch.distributed as dist

                dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
            return bool(verdict.item())

        best = self.selection.best_step if self.selection is not None and self.selection.keep_best else None
        protect = {_step_name(best)} if best is not None else set()  # keep_best: the best outlives retention
        return retain(self.uri, listing[0], keep, self.world, verify=agreed, delete=self.rank == 0, protect=protect)

    def newest_is_deepspeed(self) -> bool:
        """Whether the newest checkpoint was written by the DeepSpeed engine (one process: no broadcast)."""
        from branchout import storage
        from branchout.stages.training.engine import TAG
        from branchout.storage.checkpoint import rank_manifest_name, read_manifest

        names = self.names()
        manifest = read_manifest(storage.join(self.uri, names[-1]), rank_manifest_name(0)) if names else None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        return isinstance(files, dict) and any(rel.startswith(f"{TAG}/") for rel in files)

    def newest_step(self) -> int | None:
        """The newest checkpoint's step, the same on every rank; None when there is none."""
        names = [self.names() if self.rank == 0 else None]
        self._broadcast(names)
        return int(names[0][-1].removeprefix("step_")) if names[0] else None

    def load(self, engine, step: int) -> dict[str, Any]:
        """Load step ``step``'s checkpoint into ``engine`` (every rank; rank 0 verifies it
        first); returns its client state.

        Raises:
            CorruptCheckpointError: it does not verify.
        """
        from branchout import storage
        from branchout.storage.checkpoint import (
            CorruptCheckpointError,
            fetch_verified,
            written_world,
        )

        name = _step_name(step)
        uri = storage.join(self.uri, name)
        with tempfile.TemporaryDirectory(prefix="branchout-load-") as tmp:
            verdict: list = [None, [], self.world]  # rank 0's verified copy, problems, how many ranks wrote it
            if self.rank == 0:  # a rollback past a resume on another worker count meets the older layout
                written = written_world(uri) or self.world
                try:
                    verdict = [fetch_verified(uri, tmp, written), [], written]
                except CorruptCheckpointError as e:
                    verdict = [None, e.problems, written]
            self._broadcast(verdict)
            path, problems, written = verdict
            if problems:
                raise CorruptCheckpointError(uri, problems)
            return self._load(engine, name, path, written, tmp)

    def _distributed(self) -> bool:
        import torch.distributed as dist

        return self.world > 1 and dist.is_initialized()

    def _broadcast(self, objects: list) -> None:
        # pickled into a tensor on the current CUDA device under NCCL (Ray Train made this
        # worker's GPU current), on the CPU under gloo
        if self._distributed():
            import torch.distributed as dist

            dist.broadcast_object_list(objects, src=0)

    def _barrier(self) -> None:
        if self._distributed():
            import torch.distributed as dist

            dist.barrier()


def _summed(counts, device, world: int) -> list[int]:
    """Per-rank counts summed over the ranks (a collective on the engine's device: every rank calls it)."""
    import torch
    import torch.distributed as dist

    total = torch.as_tensor(counts, dtype=torch.int64, device=device)
    if world > 1 and dist.is_initialized():
        dist.all_reduce(total)
    return [int(n) for n in total.tolist()]


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def heldout_scorer(job: TrainJob, t, rank: int, world: int):
    """``eval_every``'s scorer: the held-out side of the job's data (each source's for a mixture)."""
    from branchout.stages.prepare.data import open_blocks
    from branchout.stages.prepare.instruct import open_roles
    from branchout.stages.training.validation import HeldoutScorer

    sources = [(name.split("/", 1)[-1], uri, w) for name, uri, w in job.mixture] or [("heldout", job.data_uri, 1.0)]
    sets = {name: (open_blocks(uri, "heldout"), open_roles(uri, "heldout")) for name, uri, _ in sources}
    return HeldoutScorer(sets, {name: w for name, _, w in sources}, t.eval_blocks, t.micro_batch_size, rank, world)
