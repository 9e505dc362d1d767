"""Deterministic fault injection: a job's worker SIGKILLs itself at a chosen step.

``BRANCHOUT_FAULTS="pretrain@25,finetune/code@40"`` makes rank 0 of each named job kill
its own process with SIGKILL (no clean-up, as the OOM killer or a spot preemption would)
right after that step is checkpointed (when due) and logged. The fault fires once per job
directory: a marker file written just before the kill lets the restarted attempt run on.

The failure tests use it so that the kill lands at an exact step; an external kill
racing a tiny model that takes 25 ms a step could land before the first checkpoint or
after the job ended. Unset, it costs one dictionary lookup per step.
"""

from __future__ import annotations

import os
import signal

from branchout import storage

ENV = "BRANCHOUT_FAULTS"


def planned() -> dict[str, int]:
    """``{job name: step}`` from the environment; empty when unset."""
    faults = {}
    for item in os.environ.get(ENV, "").split(","):
        name, sep, step = item.strip().rpartition("@")
        if sep and name and step.isdigit():
            faults[name] = int(step)
    return faults


def killer(job: str, out_uri: str, rank: int):
    """``after_step`` for ``stages.training.loop.run_steps``: kills this process at the planned step,
    or None when no fault is planned for ``job`` on this rank."""
    step = planned().get(job)
    if step is None or rank != 0:
        return None
    marker = storage.join(out_uri, f"FAULT-{step}")

    def after_step(done: int) -> None:
        if done == step and not storage.exists(marker):
            storage.write_text(marker, f"{job} killed itself at step {step} ({ENV})\n")
            os.kill(os.getpid(), signal.SIGKILL)

    return after_step
