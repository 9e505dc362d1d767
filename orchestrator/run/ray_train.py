"""Launch a distributed ``TrainJob`` as a Ray Train ``TorchTrainer`` and wait for it.

Ray Train owns the worker group, the process group and restarts after a worker dies.
Each launch is a new Ray Train run whose bookkeeping goes to ``<job dir>/ray/train-<time>``;
the checkpoints are the recipe's own (``<job dir>/checkpoints/step_N``, see
``stages.training.checkpoints.Checkpoints``): branchout, not Ray's run snapshot, decides which one to
continue from, across every earlier run of the job, and Ray Train is given none.
"""

from __future__ import annotations

import json
import os
import time

from branchout import storage
from branchout.stages.job import TrainJob


class TrainingFailedError(RuntimeError):
    """A distributed job failed after Ray Train's retries; the message is the root cause."""


# Preemption notices a job may live through, each a new Ray Train run from the step it was
# checkpointed at (they cost no steps); more means the cluster keeps losing the nodes it offers.
PREEMPTIONS = 50


def run_distributed(job: TrainJob, max_failures: int = 0) -> dict:
    """Run ``job`` on ``num_workers`` Ray Train workers; returns its result dict.

    A preemption notice ends a Ray Train run with the step checkpointed and
    ``<job>/preempted.json`` written instead of a result (``stages.training.recipe.preempted``);
    the job then starts again at once, as a new run whose workers are placed on the nodes that
    are not being drained, and resumes from that step.
    """
    from branchout.stages.training.recipe import read_result

    notice_uri = storage.join(job.out_uri, "preempted.json")
    for preemptions in range(PREEMPTIONS + 1):
        storage.remove_file(notice_uri)  # an earlier run's, if any: what is there after this one is this one's
        _fit(job, max_failures, attempt=preemptions)
        result = read_result(job)
        if result is not None:
            if preemptions:
                result["preemptions"] = preemptions
            return result
        notice = json.loads(storage.read_text(notice_uri)) if storage.exists(notice_uri) else None
        if notice is None:
            raise TrainingFailedError(f"{job.name}: finished without writing its result")
        print(f"[branchout] {job.name}: preempted at step {notice['step']} (checkpointed); starting again on the "
              f"nodes that remain ({preemptions + 1} of at most {PREEMPTIONS})", flush=True)
    raise TrainingFailedError(f"{job.name}: preempted {PREEMPTIONS + 1} times; the cluster keeps losing its nodes")


SIGTERM_HOOK = "branchout.stages.training.sigterm.install"


def _fit(job: TrainJob, max_failures: int, attempt: int) -> None:
    """One Ray Train run of ``job``: its workers train from the job's newest good checkpoint."""
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from branchout.stages.training.distributed import train_worker

    t = job.spec()
    r = t.resources_per_worker
    fs, path = storage.filesystem(storage.join(job.out_uri, "ray"))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},  # pickled to every worker as it is
        torch_config=TorchConfig(backend=process_group_backend(r.uses_gpu)),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=r.uses_gpu,
                                     resources_per_worker=r.ray_bundle()),
        run_config=RunConfig(
            name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{attempt}", storage_path=path,
            storage_filesystem=fs, failure_config=FailureConfig(max_failures=max_failures),
            # a SIGTERM to a worker checkpoints the step it is at (stages.training.sigterm). The
            # hook goes in as the variable Ray's worker reads at start: Ray turns the
            # runtime_env field into it for a job's runtime_env only, not an actor's
            worker_runtime_env={"env_vars": {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: SIGTERM_HOOK}},
        ),
    )
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps worker errors in several types; report the root cause
        raise TrainingFailedError(root_cause(e)) from e


def process_group_backend(uses_gpu: bool) -> str:
    """The torch.distributed backend of a Ray Train job.

    On GPUs a process group with a backend per device: NCCL for CUDA tensors (gradients,
    the loss), gloo for anything that is on the host (a checkpoint choice broadcast,
    DeepSpeed's host-side bookkeeping). An NCCL-only group, Ray's default, fails on the
    first CPU tensor with "No backend type associated with device type cpu".
    BRANCHOUT_SIMULATE_GPUS: GPU resources are scheduling tokens of a fake cluster (Ray's
    fake multi-node autoscaler); train on the CPU with gloo.
    """
    return "cpu:gloo,cuda:nccl" if uses_gpu and not simulate_gpus() else "gloo"


def simulate_gpus() -> bool:
    import os

    return os.environ.get("BRANCHOUT_SIMULATE_GPUS", "") not in ("", "0")


def root_error(error: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrappers (``RayTaskError.cause``, chained causes)."""
    seen = {id(error)}
    while True:
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException) or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def root_cause(error: BaseException) -> str:
    """The innermost error's last line: what a user needs, without Ray's wrapping."""
    seen = root_error(error)
    # Collapse a multi-line message (pydantic, Ray) into one line a table can show.
    lines = [ln.strip() for ln in str(seen).splitlines()
             if ln.strip() and not ln.strip().startswith("For further information")]
    message = " ".join(lines)[:300] or "(no message)"
    name = type(seen).__name__
    return message if message.startswith(name) else f"{name}: {message}"
