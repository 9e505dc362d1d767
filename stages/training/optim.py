"""Optimizer and learning-rate schedule shared by every training path."""

from __future__ import annotations

import math

from branchout.core.spec import OptimizerSpec, ScheduleSpec


def lr_lambda(schedule: ScheduleSpec, total_steps: int):
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio``; a multiplier of lr."""
    warmup, floor = schedule.warmup_steps, schedule.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


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


def build_optimizer(model, opt: OptimizerSpec):
    import torch

    return torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.lr,
                             betas=opt.betas, eps=opt.eps, fused=False, foreach=True)


def build_scheduler(optimizer, schedule: ScheduleSpec, total_steps: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, total_steps))
