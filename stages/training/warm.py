"""The warm-pool worker: a long-lived Ray actor that runs fan-out jobs (and then their
evaluations) one after another.

Launching every small fine-tune as its own Ray Train run costs ~12 s before its first
step on 2 cores, and importing torch/transformers in a fresh worker another ~3 s. A
``JobRunner`` pays both once: it imports everything when it starts, keeps tokenizers it
has loaded, and receives the parent's weights as an object-store reference that Ray
maps into the process once per node (zero-copy, read-only). A job then costs model
construction on those weights and its own steps.
"""

from __future__ import annotations

import os

from branchout.core.progress import announce
from branchout.stages.job import TrainJob


class JobRunner:
    def __init__(self) -> None:
        import peft  # noqa: F401  (imported now, not in the first job)
        import torch  # noqa: F401
        import transformers  # noqa: F401

        self._tokenizers: dict[str, object] = {}

    def ready(self) -> int:
        return os.getpid()

    def run(self, job: TrainJob, shared_base: dict | None, dispatched: float) -> dict:
        from branchout.stages.prepare.tokenizer import load_tokenizer
        from branchout.stages.training.single_worker import run_single_worker
        from branchout.storage.checkpoint import fetch_verified

        announce(job.hub_name, job.name)
        if job.tokenizer_uri not in self._tokenizers:
            self._tokenizers[job.tokenizer_uri] = load_tokenizer(fetch_verified(job.tokenizer_uri))
        try:
            result = run_single_worker(job, shared_base, self._tokenizers[job.tokenizer_uri])
        finally:
            _release_device_memory()
        return {**result, "dispatched": dispatched, "pool_pid": os.getpid()}

    def call(self, fn, args: tuple, name: str, hub_name: str | None) -> dict:
        """Run ``fn(*args)`` (an evaluation) here, where torch, transformers and the model
        classes are already imported (and CUDA initialised): a cold task pays all of that."""
        announce(hub_name, name)
        try:
            return {**fn(*args), "pool_pid": os.getpid()}
        finally:
            _release_device_memory()


def _release_device_memory() -> None:
    """Give the GPU memory of a finished job back to the device.

    A runner holds a fraction of a GPU for job after job; PyTorch's caching allocator would
    otherwise keep the previous job's blocks reserved, and a packed neighbour on the same
    GPU could run out of memory that nothing uses.
    """
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
