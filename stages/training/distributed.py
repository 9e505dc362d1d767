"""The recipe (``stages.training.recipe.train``) on Ray Train workers: pretrain and multi-worker fine-tunes.

``train_worker`` is Ray Train's ``train_loop_per_worker``. Ray Train has already set up
the process group (gloo on CPU, NCCL on GPU); DeepSpeed joins it. Checkpoints are the
recipe's (``<job>/checkpoints/step_N``: every rank writes its shards and a manifest of
them), not Ray Train's: branchout chooses what to resume from, across restarts inside one
Ray Train run (``max_failures``) and new runs of the job (``branchout resume``), and applies
retention. Under ZeRO-3 the model is built already partitioned and exported by a
layer-by-layer consolidation onto rank 0 (see the recipe).
"""

from __future__ import annotations

from branchout.stages.job import TrainJob


def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: the recipe on this rank."""
    import ray.train

    from branchout.stages.training.recipe import train

    job: TrainJob = config["job"]
    ctx = ray.train.get_context()
    train(job, ctx.get_world_rank(), ctx.get_world_size())
