"""The recipe (``stages.recipe.train``) on Ray Train workers: pretrain and multi-worker fine-tunes.

``train_worker`` is Ray Train's ``train_loop_per_worker``. Ray Train has already set up
the process group (gloo on CPU, NCCL on GPU); DeepSpeed joins it. Checkpoints go
through ``ray.train.report`` (``RayTrainCheckpoints``) and Ray Train restarts the worker
group after a worker dies (``max_failures``). Every rank writes a manifest of its own
shards after writing them; a checkpoint is good when all ranks' manifests are there and
every file verifies.

On (re)start, rank 0 picks the newest *good* checkpoint in the job's Ray Train storage,
falling back past damaged ones and saying why, and every rank loads it: model,
optimizer, scheduler, RNG and data position (= step). This covers both a restart inside
one Ray Train run and a new run of the same job (``branchout resume``). Rank 0 also
applies retention: the newest ``keep_checkpoints`` good checkpoints stay, the newest good
one always. Under ZeRO-3 the model is built already partitioned and exported by a
layer-by-layer consolidation onto rank 0 (see the recipe).
"""

from __future__ import annotations

import re
import tempfile

from branchout.stages.job import TrainJob


def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: the recipe on this rank, checkpoints through Ray Train."""
    import ray.train

    from branchout.stages.recipe import train

    job: TrainJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train(job, RayTrainCheckpoints(job, rank, world), rank, world)


class RayTrainCheckpoints:
    """A worker group's checkpoints: every rank writes its own shards and a manifest of
    them, and ``ray.train.report`` puts them under ``<job>/ray/<run>/checkpoint_*``."""

    def __init__(self, job: TrainJob, rank: int, world: int):
        self.job, self.rank, self.world = job, rank, world

    def resume(self, engine, logger) -> dict | None:
        from branchout.stages import storage
        from branchout.stages.checkpoint import fetch_verified

        chosen = _choose_checkpoint(self.job, self.rank, self.world, logger)
        if chosen is None:
            return None
        uri = storage.join(ray_checkpoints_uri(self.job), chosen)
        with tempfile.TemporaryDirectory(prefix="branchout-load-") as tmp:
            # Rank 0 has verified it. On shared disk every rank reads it in place; from an
            # object store each rank downloads it, verifying what it downloaded.
            path = storage.local_path(uri) if storage.is_local(uri) else fetch_verified(uri, tmp, world=self.world)
            return engine.load(path)

    def save(self, engine, step: int, loss: float) -> None:
        import ray.train

        from branchout.stages.checkpoint import write_rank_manifest
        from branchout.stages.loop import rng_state

        with tempfile.TemporaryDirectory(prefix="branchout-ckpt-") as path:
            engine.save(path, {"step": step, "rng": rng_state()})
            write_rank_manifest(path, self.rank, self.world, {"step": step, "job": self.job.name})
            self.job.check_lease()
            ray.train.report({"step": step, "loss": loss}, checkpoint=ray.train.Checkpoint.from_directory(path))
        _retain_together(self.job, self.job.spec().keep_checkpoints, self.rank, self.world, engine.device)


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
