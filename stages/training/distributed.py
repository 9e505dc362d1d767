"""The recipe (``stages.training.recipe.train``) on Ray Train workers: pretrain and multi-worker fine-tunes.

``train_worker`` is Ray Train's ``train_loop_per_worker``. Ray Train has already set up
the process group (gloo on CPU, NCCL on GPU); DeepSpeed joins it. Checkpoints are the
recipe's (``<job>/checkpoints/step_N``: every rank writes its shards and a manifest of
them), not Ray Train's: branchout chooses what to resume from, across restarts inside one
Ray Train run (``max_failures``) and new runs of the job (``branchout resume``), and applies
retention. On a preemption notice (a drained node) the workers checkpoint the step they are
at and end; ``orchestrator.run.ray_train`` starts the job again on the nodes that remain.
Under ZeRO-3 the model is built already partitioned and exported by a layer-by-layer
consolidation onto rank 0 (see the recipe).
"""

from __future__ import annotations

from branchout.stages.job import TrainJob


def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: the recipe on this rank."""
    import ray.train

    from branchout.stages.training import sigterm
    from branchout.stages.training.recipe import train

    job: TrainJob = config["job"]
    ctx = ray.train.get_context()
    with sigterm.training():  # a SIGTERM now checkpoints the step first (stages.training.sigterm)
        train(job, ctx.get_world_rank(), ctx.get_world_size(), preemption=preemption_notice)


def preemption_notice() -> bool:
    """Whether a node of this worker group is being preempted: Ray Train's watcher of Ray's node
    drains (the autoscaler drains a spot node on its cloud's notice; on Kubernetes the pod's
    preStop hook drains it, deploy/). Every rank must call it the same number of times: it
    agrees on rank 0's answer."""
    import ray.train

    return ray.train.get_preemption_info() is not None
