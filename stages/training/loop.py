"""The training loop every job runs: read blocks, step, log, checkpoint.

It knows nothing about Ray, DeepSpeed or peft: the engine takes optimizer steps and the
caller's ``save_checkpoint`` decides where a checkpoint goes (a Ray Train report, or a
published directory for fan-out jobs). The data position is the step number (see
``stages.training.batches``), so a job resumed from step ``s`` reads what it would have read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from branchout.core.spec import TrainingSpec
from branchout.stages.training.batches import step_micro_batches
from branchout.stages.training.engine import Engine
from branchout.stages.training.metrics import MetricsLogger
from branchout.stages.training.mixture import block_order
from branchout.stages.training.optim import cooldown_steps
from branchout.stages.training.validation import HeldoutScorer, Selection


class NonFiniteLoss(FloatingPointError):
    """A NaN or infinite loss in steps ``first``..``last`` (the window read at ``last``); every
    rank raises it at the same step (the window's sum is all-reduced)."""

    def __init__(self, message: str, first: int, last: int):
        super().__init__(message)
        self.first, self.last = first, last

    def __reduce__(self):  # crosses Ray's process boundary intact
        return type(self), (self.args[0], self.first, self.last)


@dataclass
class LoopResult:
    first_step: int  # the step this attempt started from (> 0 when resumed)
    steps: int
    final_loss: float
    tokens_per_s: float
    seconds: float
    first_step_at: float | None = None  # wall time when the first optimizer step of this attempt ended
    preempted: bool = False  # ended early on a preemption notice, checkpointed at ``steps``


def run_steps(engine: Engine, blocks: np.ndarray, t: TrainingSpec, total_steps: int,
              start_step: int, rank: int, world: int, logger: MetricsLogger | None,
              save_checkpoint: Callable[[int, float], None],
              after_step: Callable[[int], None] | None = None, roles=None,
              scorer: HeldoutScorer | None = None, selection: Selection | None = None,
              prober=None, data_skip: int = 0, before_step: Callable[[int], None] | None = None,
              preemption: Callable[[], bool] | None = None) -> LoopResult:
    """Train from ``start_step`` to ``total_steps``; checkpoint every ``t.checkpoint_every``.

    The loss stays on the engine's device: each step's loss is added to a window sum there
    and read (one device→host copy, averaged over ranks) only on *report* steps, the ones
    that are logged or checkpointed. A non-finite loss anywhere in the window makes the sum
    non-finite, so it is caught on the next report step, before its checkpoint is written.

    ``after_step(step)`` runs once a step is checkpointed (when due) and logged. ``roles``:
    instruction data's token roles, row for row with ``blocks`` (``stages.prepare.instruct``); each
    micro-batch is then an ``(ids, roles)`` pair, so only answers are scored.

    ``prober`` (``pretrain.probes``, ``stages.training.probes.Prober``): at its probe points, once
    the step is checkpointed and logged, every rank pauses for the probes; when the rule says
    stop, the run ends after a cooldown (``engine.early``: the wsd schedule decays over it).

    ``data_skip``: the data position runs this many steps ahead of the step number (each NaN
    rollback skips the batches of the steps it undid). ``before_step(step)`` runs before step
    ``step + 1`` is taken (fault injection).

    ``preemption()`` is asked on every report step (every rank, the same steps: it may be a
    collective): True when a node of this job is about to be taken away (Ray's drain of a
    preempted node). The step is then checkpointed at once and the loop ends with
    ``LoopResult.preempted``, so that the job continues elsewhere from exactly this step.

    ``scorer`` (``eval_every``): the held-out loss every ``t.eval_every`` steps and at the last,
    logged beside the training loss. ``selection`` acts on it: a new best is checkpointed when
    ``keep_best`` (kept past retention by the caller's checkpoints), and ``early_stop`` ends the
    loop (``LoopResult.steps`` is then where it stopped).

    Raises:
        NonFiniteLoss: a step's loss was NaN or infinite.
    """
    import torch

    order = block_order(blocks, t.seed)  # a pretraining mixture interleaves its sources
    seq_len = blocks.shape[1]
    tokens_per_step = t.global_batch_size * seq_len
    started = window_start = time.perf_counter()
    window_steps = 0  # steps since the last log line (its tokens/s)
    unread, unread_loss = 0, None  # steps since the last read, and Σ of their losses on the device
    loss = float("nan")
    first_step_at = None
    done = start_step
    early = getattr(engine, "early", None)
    if early is not None and early.end is not None:  # a resumed run that was already told to stop
        total_steps = min(total_steps, early.end)
    step = start_step
    preempted = False
    while step < total_steps:
        if before_step is not None:
            before_step(step)
        micro = []
        for idx in step_micro_batches(order, step + data_skip, t.global_batch_size, t.micro_batch_size, rank, world):
            idx = np.sort(idx)
            ids = torch.from_numpy(blocks[idx].astype(np.int64))
            micro.append(ids if roles is None else (ids, torch.from_numpy(roles[idx].astype(np.int64))))
        step_loss = torch.as_tensor(engine.train_step(micro), dtype=torch.float32)
        unread, unread_loss = unread + 1, step_loss if unread_loss is None else unread_loss + step_loss
        window_steps += 1
        done = step + 1
        checkpoint_due = done % t.checkpoint_every == 0 or done == total_steps
        log_due = done % t.log_every == 0 or done == total_steps or done == start_step + 1
        eval_due = scorer is not None and (done % t.eval_every == 0 or done == total_steps)
        if checkpoint_due or log_due or eval_due:
            # every rank takes this branch on the same steps: the reduction is a collective
            loss, total = _read_across_ranks(torch.stack([step_loss, unread_loss]), world)
            if not math.isfinite(total):
                raise NonFiniteLoss(f"loss is {total / unread} in steps {done - unread + 1}-{done}; "
                                    "lower the learning rate", done - unread + 1, done)
            unread, unread_loss = 0, None
        # a notice between two report steps waits for the next: it costs a collective, and a
        # preemption notice gives tens of seconds at least (GCP 30 s, AWS 120 s)
        preempted = (checkpoint_due or log_due or eval_due) and preemption is not None and preemption() \
            and done < total_steps
        if preempted:
            checkpoint_due = True
        if first_step_at is None:  # the first step is always read: its work is done by now
            first_step_at = time.time()
        scores = scorer(engine) if eval_due else {}  # every rank: a collective
        stop = False
        if scores and selection is not None:
            if selection.observe(done, scores["eval_loss"]) and selection.keep_best:
                checkpoint_due = True  # the best weights so far: exported in the end (keep_best)
            if selection.should_stop and done < total_steps:
                selection.stopped_at, stop = done, True
        # The checkpoint of a step is durable before the step is logged: whoever sees
        # step s in the log (a user, the driver, a test) knows a restart resumes from s
        # or later, never from an earlier checkpoint.
        if checkpoint_due:
            save_checkpoint(done, loss)
        if logger is not None and log_due:
            elapsed = time.perf_counter() - window_start
            logger.log(done, loss=loss, lr=engine.lr(),
                       tokens_per_s=window_steps * tokens_per_step / max(elapsed, 1e-9), **scores)
        elif logger is not None and scores:
            logger.log(done, **scores)
        if log_due:
            window_start, window_steps = time.perf_counter(), 0
        if after_step is not None:
            after_step(done)
        if prober is not None and not preempted and prober.due(done) and prober(engine, done) and done < total_steps:
            total_steps = min(total_steps, done + cooldown_steps(t.schedule, done))
            if early is not None:
                early.stop_at, early.end = done, total_steps
        if stop or preempted:
            break
        step += 1
    seconds = time.perf_counter() - started
    trained = done - start_step
    return LoopResult(first_step=start_step, steps=done, final_loss=loss,
                      tokens_per_s=trained * tokens_per_step / max(seconds, 1e-9), seconds=seconds,
                      first_step_at=first_step_at, preempted=preempted)


def _read_across_ranks(values, world: int) -> list[float]:
    """``values`` averaged over the ranks and read to the host: the loop's only sync point.

    The all-reduce runs on the tensor's own device, the engine's (CUDA under NCCL).
    """
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.all_reduce(values)
        values = values / world
    return values.tolist()


def rng_state() -> dict:
    """Every RNG a step draws from, as tensors and numbers (``weights_only`` loadable)."""
    import random

    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate()}


def set_rng_state(state: dict | None) -> None:
    import random

    import torch

    if not state:
        return
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
