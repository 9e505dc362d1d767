"""Resume a DeepSpeed checkpoint on another number of workers.

A ZeRO checkpoint is cut by the ranks that wrote it: each rank saved its own partition of
the fp32 master weights and of Adam's moments (ZeRO 1-3, and the bf16 optimizer even at
stage 0). A job with another worker count cannot read those partitions as they are.
DeepSpeed's *universal* checkpoint can: ``ds_to_universal`` joins the partitions into one
file per parameter and state (``zero/<name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``,
``step.pt``), and an engine with ``checkpoint.load_universal`` takes from each file the
slice its own rank owns, one parameter at a time, so no rank ever holds the whole
optimizer. The learning-rate schedule, the RNG state and the data position travel in the
checkpoint's client state as always; the data order depends on the step only
(``stages.training.batches``), so the resumed job reads exactly the blocks the
uninterrupted one would have.

Stage 0 in fp32 keeps a plain torch optimizer whose state is whole on every rank (rank 0
saves it): any worker count loads it as it is.

One rank converts (the one that verified the checkpoint and holds a copy of it) and
publishes the universal copy beside the checkpoints with a manifest; every rank then
loads it and the copy is removed. The conversion reads the checkpoint's files with
``weights_only`` loads, as every checkpoint read here does (``ds_files.safe_load``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os

from branchout.stages.training.ds_files import weights_only_loads
from branchout.stages.training.engine import TAG


def partitioned(checkpoint_dir: str) -> bool:
    """Whether the DeepSpeed checkpoint in ``checkpoint_dir`` holds per-rank optimizer
    partitions (ZeRO 1-3 and the bf16 optimizer), which another worker count cannot load."""
    folder = os.path.join(checkpoint_dir, TAG)
    return os.path.isdir(folder) and any(name.endswith("optim_states.pt") for name in os.listdir(folder))


def to_universal(checkpoint_dir: str, out_dir: str) -> str:
    """DeepSpeed's ``ds_to_universal`` of ``checkpoint_dir`` into ``out_dir/state``; returns ``out_dir``.

    It runs in this process, without its worker pools (a training worker's process already
    holds a process group's threads, which a fork would copy half-held), and its progress
    prints are kept out of the job's log.
    """
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=os.path.join(checkpoint_dir, TAG), output_folder=os.path.join(out_dir, TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    noise = io.StringIO()
    try:
        with weights_only_loads(), contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            ds_to_universal.main(args)
    except Exception as e:  # what DeepSpeed printed on the way is the useful part
        raise RuntimeError(f"joining the ZeRO partitions of {checkpoint_dir} failed: {e}\n"
                           f"{noise.getvalue()[-3000:]}") from e
    return out_dir
