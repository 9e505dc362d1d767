"""Two ways to take an optimizer step, one interface: DeepSpeed (multi-worker) and plain torch.

Multi-worker training goes through DeepSpeed ZeRO inside Ray Train. A single-worker
fine-tune does not need a process group, ZeRO partitioning or DeepSpeed's start-up, so
it runs a plain torch loop with the same optimizer, schedule, precision and clipping.
Both expose ``train_step`` / ``lr`` / ``save`` / ``load`` / ``state_dict_for_export``,
which is all the training loop in ``stages.loop`` uses.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from branchout.orchestrator.spec import TrainingSpec
from branchout.stages.optim import build_optimizer, build_scheduler, lr_lambda, param_groups


class Engine(Protocol):
    def train_step(self, micro_batches: list) -> float: ...
    def lr(self) -> float: ...
    def save(self, path: str, client_state: dict[str, Any]) -> None: ...
    def load(self, path: str) -> dict[str, Any]: ...
    def state_dict_for_export(self) -> dict | None: ...


def deepspeed_config(t: TrainingSpec, world_size: int, use_gpu: bool) -> dict:
    """DeepSpeed's JSON config from the spec; ``deepspeed.config`` is merged last."""
    from branchout.orchestrator.spec import deep_merge

    ds = t.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        # Without this, save_16bit_model / export would write empty tensors under ZeRO-3.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world_size),
        "gradient_clipping": t.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        # ZeRO-Offload needs DeepSpeed's own CPU Adam; it is declared here so DeepSpeed builds it.
        o = t.optimizer
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}}
    return deep_merge(config, ds.config)


class DeepSpeedEngine:
    """ZeRO 0-3 with optional offload, on an already-initialised process group (Ray Train)."""

    def __init__(self, model, t: TrainingSpec, total_steps: int, world_size: int, use_gpu: bool):
        import deepspeed

        self.config = deepspeed_config(t, world_size, use_gpu)
        factor = lr_lambda(t.schedule, total_steps)
        if "optimizer" in self.config:
            import torch

            def scheduler(opt):
                return torch.optim.lr_scheduler.LambdaLR(opt, factor)

            engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=param_groups(model, t.optimizer.weight_decay),
                lr_scheduler=scheduler, config=self.config)
        else:
            optimizer = build_optimizer(model, t.optimizer)
            engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer,
                lr_scheduler=build_scheduler(optimizer, t.schedule, total_steps), config=self.config)
        self.engine = engine
        self.zero_stage = t.deepspeed.zero_stage

    def train_step(self, micro_batches: list) -> float:
        import torch
        import torch.distributed as dist

        total = torch.zeros((), dtype=torch.float32)
        for batch in micro_batches:
            batch = batch.to(self.engine.device)
            loss = self.engine(input_ids=batch, labels=batch).loss
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            total += loss.detach().float().cpu()
        total /= len(micro_batches)
        if dist.is_initialized():
            dist.all_reduce(total)
            total /= dist.get_world_size()
        return float(total)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, path: str, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(path, tag="state", client_state=client_state)

    def load(self, path: str) -> dict[str, Any]:
        # DeepSpeed's own loader unpickles anything (weights_only=False); checkpoints come
        # from shared storage, so its files are read through safe_load instead.
        self.engine.checkpoint_engine.load = safe_load
        _, client_state = self.engine.load_checkpoint(path, tag="state")
        return client_state or {}

    def state_dict_for_export(self) -> dict | None:
        """Full weights on rank 0 (None elsewhere); every rank must call it (ZeRO-3 gathers)."""
        import deepspeed
        import torch.distributed as dist

        module = self.engine.module
        rank = dist.get_rank() if dist.is_initialized() else 0
        if self.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
        else:
            state = {k: v.detach().cpu() for k, v in module.state_dict().items()} if rank == 0 else None
        return state


class TorchEngine:
    """A single process: AdamW, warmup-cosine, optional bf16 autocast, gradient accumulation."""

    def __init__(self, model, t: TrainingSpec, total_steps: int, device: str = "cpu"):
        import torch

        if device.startswith("cuda") and t.deepspeed.precision in ("bf16", "fp16"):
            # a frozen base (LoRA) is only read: keep it in 16 bits on the GPU, adapters in fp32
            half = torch.bfloat16 if t.deepspeed.precision == "bf16" else torch.float16
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(half)
        self.model = model.to(device)
        self.device = device
        self.optimizer = build_optimizer(model, t.optimizer)
        self.scheduler = build_scheduler(self.optimizer, t.schedule, total_steps)
        self.grad_clip = t.optimizer.grad_clip
        self.autocast = t.deepspeed.precision in ("bf16", "fp16")
        self.dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(t.deepspeed.precision)

    def train_step(self, micro_batches: list) -> float:
        import torch

        self.model.train()
        total = 0.0
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        for batch in micro_batches:
            batch = batch.to(self.device)
            with torch.autocast(device_type, dtype=getattr(torch, self.dtype or "bfloat16"), enabled=self.autocast):
                loss = self.model(input_ids=batch, labels=batch).loss
            (loss / len(micro_batches)).backward()
            total += float(loss.detach())
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(micro_batches)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def _trainable_state(self) -> dict:
        return {k: v for k, v in self.model.state_dict().items()
                if k in {n for n, p in self.model.named_parameters() if p.requires_grad}}

    def save(self, path: str, client_state: dict[str, Any]) -> None:
        import torch

        os.makedirs(path, exist_ok=True)
        torch.save({"model": self._trainable_state(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "client_state": client_state},
                   os.path.join(path, "state.pt"))

    def load(self, path: str) -> dict[str, Any]:

        state = safe_load(os.path.join(path, "state.pt"), map_location=self.device)
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client_state"]

    def state_dict_for_export(self) -> dict | None:
        return None  # the model object itself is exported (save_pretrained handles peft too)


def safe_load(path: str, map_location=None):
    """``torch.load(weights_only=True)``: tensors, numbers, strings and containers only.

    A checkpoint on shared storage is data anyone with write access to the bucket could
    have replaced; unpickling arbitrary objects from it would run their code. The only
    classes allowed are the few plain DeepSpeed types its optimizer states hold (found by
    loading ZeRO 0-3 checkpoints in fp32 and bf16).
    """
    import torch

    with torch.serialization.safe_globals(_deepspeed_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _deepspeed_globals() -> list:
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # a plain-torch checkpoint needs none of them
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
