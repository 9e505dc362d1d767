"""A single-worker fine-tune (or from-scratch baseline): one process, no Ray Train.

Fan-out jobs are small and many, so they skip Ray Train and DeepSpeed start-up: the
recipe (``stages.training.recipe.train``) runs in the calling process, on a warm runner
(``stages.training.warm``) or as a Ray task, with the plain torch engine. Its checkpoints are the
recipe's (``<job>/checkpoints/step_N``, one rank's); a retried job resumes from the newest
one that verifies.
"""

from __future__ import annotations

from branchout.stages.job import TrainJob


def run_single_worker(job: TrainJob, shared_base: dict | None = None, tokenizer=None) -> dict:
    """Train ``job`` to completion in this process and export it; returns its result.

    ``shared_base``: the parent's weights from Ray's object store (warm pool); ``tokenizer``:
    an already loaded tokenizer. Both only save time; the result is the same without them.
    """
    from branchout.stages.training.recipe import train

    return train(job, shared_base=shared_base, tokenizer=tokenizer)
