"""Optimizer and learning-rate schedule shared by every training path."""

from __future__ import annotations

import math

from branchout.core.spec import OptimizerSpec, ScheduleSpec


class EarlyEnd:
    """Where a run that ends before its budget (``pretrain.stop``) ends: read by the wsd
    schedule, which then cools down over the steps left to it, and by the loop."""

    def __init__(self):
        self.stop_at: int | None = None  # the step the stop was decided at
        self.end: int | None = None  # the last step, after the cooldown


def cooldown_steps(schedule: ScheduleSpec, steps: int) -> int:
    return max(1, round(schedule.cooldown_fraction * steps))


def lr_lambda(schedule: ScheduleSpec, total_steps: int, early: EarlyEnd | None = None):
    """A multiplier of lr. cosine: linear warmup to 1, then cosine decay to ``min_lr_ratio``.
    wsd: warmup, 1 until the last ``cooldown_fraction`` of the steps, then linear to
    ``min_lr_ratio``; when ``early`` says the run ends sooner, the cooldown runs from the
    stop to that end instead."""
    warmup, floor = schedule.warmup_steps, schedule.min_lr_ratio

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def wsd(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if early is not None and early.end is not None:
            start, end = early.stop_at, early.end
        else:
            start, end = total_steps - cooldown_steps(schedule, total_steps), total_steps
        if step < start:
            return 1.0
        return floor + (1 - floor) * max(0.0, (end - step) / max(1, end - start))

    return wsd if schedule.kind == "wsd" else cosine


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and norm weights (1-D) are not decayed.

    A ZeRO-3 shard built under ``zero.Init`` is a 1-D tensor whatever the parameter's
    shape, so "matrix or not" is read from ``ds_shape`` when there is one. Empty groups are
    dropped: ZeRO-3 drops them itself, and a scheduler built on the optimizer would then
    hold one learning rate too many.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, opt: OptimizerSpec, fused: bool = False):
    """AdamW over ``param_groups``; ``fused``: torch's single-kernel step (``stages.training.kernels``
    decides it: on GPUs by default), else the multi-tensor (foreach) one."""
    return adamw(param_groups(model, opt.weight_decay), opt, fused)


def adamw(groups: list[dict], opt: OptimizerSpec, fused: bool):
    import torch

    return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                             fused=fused, foreach=None if fused else True)


def build_scheduler(optimizer, schedule: ScheduleSpec, total_steps: int, early: EarlyEnd | None = None):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, total_steps, early))
