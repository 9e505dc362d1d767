"""A training job's checkpoints (``Checkpoints``): one layout for one process and for a worker
group, chosen, verified, loaded (resharded when another number of workers wrote them), saved
and retained by the recipe (``stages.training.recipe``) on every rank."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from branchout.stages.job import TrainJob


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


def _step_name(step: int) -> str:
    return f"step_{step:08d}"
