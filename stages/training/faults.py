"""Deterministic fault injection: a job's worker SIGKILLs itself at a chosen step.

``BRANCHOUT_FAULTS="pretrain@25,finetune/code@40"`` makes rank 0 of each named job kill
its own process with SIGKILL (no clean-up, as the OOM killer or a spot preemption would)
right after that step is checkpointed (when due) and logged. The fault fires once per job
directory: a marker file written just before the kill lets the restarted attempt run on.

The failure tests use it so that the kill lands at an exact step; an external kill
racing a tiny model that takes 25 ms a step could land before the first checkpoint or
after the job ended. Unset, it costs one dictionary lookup per step.

``name@step:nan`` instead makes the job's loss non-finite at that step (an adapter farm
member's weights set to NaN before the step: ``poisoner``), once per job directory too,
so the attempt that follows it trains normally.

``name@step:hold`` makes every rank of the job wait after that step until a preemption notice
has reached it (``held``), so a test's node drain lands at an exact step instead of racing
the training; a job may hold at several steps (``pretrain@20:hold,pretrain@40:hold``).
"""

from __future__ import annotations

import os
import signal
import time

from branchout import storage

ENV = "BRANCHOUT_FAULTS"


def planned(kind: str = "kill") -> dict[str, int]:
    """``{job name: step}`` of the faults of ``kind`` ("kill", "nan" or "hold") in the environment."""
    faults = {}
    for item in os.environ.get(ENV, "").split(","):
        name, sep, rest = item.strip().rpartition("@")
        step, _, what = rest.partition(":")
        if sep and name and step.isdigit() and (what or "kill") == kind:
            faults[name] = int(step)
    return faults


def hold_steps(job: str) -> set[int]:
    """Every step after which ``job`` holds (``name@step:hold``, any number of them)."""
    steps = set()
    for item in os.environ.get(ENV, "").split(","):
        name, sep, rest = item.strip().rpartition("@")
        step, _, what = rest.partition(":")
        if sep and name == job and step.isdigit() and what == "hold":
            steps.add(int(step))
    return steps


def poisoner(job: str, out_uri: str):
    """For an adapter farm member: a function of the step about to run that says (once)
    whether to make its loss non-finite there; None when no NaN is planned for ``job``."""
    step = planned("nan").get(job)
    if step is None:
        return None
    marker = storage.join(out_uri, f"FAULT-nan-{step}")

    def due(next_step: int) -> bool:
        if next_step == step and not storage.exists(marker):
            storage.write_text(marker, f"{job}: loss made non-finite at step {step} ({ENV})\n")
            return True
        return False

    return due


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


HOLD_S = 300  # a hold gives up after this long, so a drain that never comes cannot hang a job


def held(job: str, preemption):
    """For ``before_step``: a function of the steps done that, right after the planned step, waits until ``preemption()`` says a notice arrived; None when no hold is planned.
    ``preemption`` is a collective that agrees on rank 0's answer, so every rank asks it the
    same number of times and all of them go on together."""
    steps = hold_steps(job)
    if not steps or preemption is None:
        return None

    def wait(done: int) -> None:
        if done not in steps:
            return
        deadline = time.time() + HOLD_S
        while not preemption() and time.time() < deadline:
            time.sleep(0.2)

    return wait
