"""A single-worker fine-tune (or from-scratch baseline): one process, no Ray Train.

Fan-out jobs are small and many, so they skip Ray Train and DeepSpeed start-up: the
recipe (``stages.recipe.train``) runs in the calling process, on a warm runner
(``stages.warm``) or as a Ray task, with the plain torch engine. Its checkpoints are
published under the job's ``checkpoints/step_N`` with a manifest; a retried job resumes
from the newest one that verifies.
"""

from __future__ import annotations

import tempfile

from branchout.stages.job import TrainJob


def run_single_worker(job: TrainJob, shared_base: dict | None = None, tokenizer=None) -> dict:
    """Train ``job`` to completion in this process and export it; returns its result.

    ``shared_base``: the parent's weights from Ray's object store (warm pool); ``tokenizer``:
    an already loaded tokenizer. Both only save time; the result is the same without them.
    """
    from branchout.stages.recipe import train

    return train(job, PublishedCheckpoints(job), shared_base=shared_base, tokenizer=tokenizer)


class PublishedCheckpoints:
    """One process's checkpoints: ``<job>/checkpoints/step_N``, each published with a manifest."""

    def __init__(self, job: TrainJob):
        self.job = job

    def names(self) -> list[str]:
        from branchout.stages import storage

        return [n for n in storage.listdir(self.job.checkpoints_uri) if n.startswith("step_")]

    def resume(self, engine, logger) -> dict | None:
        """Raises:
            CorruptCheckpointError: checkpoints exist but none verifies (never silently
                restart from step 0)."""
        from branchout.stages.checkpoint import CorruptCheckpointError, newest_good

        names = self.names()
        name, path, skipped = newest_good(self.job.checkpoints_uri, names)
        if skipped and logger:
            logger.state("running", checkpoint_warnings=skipped)
        for line in skipped:
            print(f"[branchout] skipping damaged checkpoint: {line}", flush=True)
        if names and name is None:
            raise CorruptCheckpointError(self.job.checkpoints_uri, ["no checkpoint verifies: " + " | ".join(skipped)])
        return engine.load(path) if path is not None else None

    def save(self, engine, step: int, loss: float) -> None:
        from branchout.stages import storage
        from branchout.stages.checkpoint import publish_dir, retain
        from branchout.stages.loop import rng_state

        if step == self.job.steps:
            return  # the exported model is the final state; no need to resume past it
        with tempfile.TemporaryDirectory(prefix="branchout-ckpt-") as path:
            engine.save(path, {"step": step, "rng": rng_state()})
            self.job.check_lease()
            publish_dir(path, storage.join(self.job.checkpoints_uri, f"step_{step:08d}"))
        retain(self.job.checkpoints_uri, self.names(), self.job.spec().keep_checkpoints)
