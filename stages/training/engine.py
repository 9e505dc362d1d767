"""Two ways to take an optimizer step, one interface: DeepSpeed (multi-worker) and plain torch.

Multi-worker training goes through DeepSpeed ZeRO inside Ray Train. A single-worker
fine-tune does not need a process group, ZeRO partitioning or DeepSpeed's start-up, so
it runs a plain torch loop with the same optimizer, schedule, precision and clipping.
Both expose ``train_step`` / ``lr`` / ``save`` / ``load`` / ``state_dict_for_export``,
which is all the training loop in ``stages.training.loop`` uses.

Device rule: everything a step produces stays on the engine's ``device``. ``train_step``
returns the step's loss as a 0-dim tensor there, without reading it; the loop reads it
(and averages it over ranks) only on the steps it logs or checkpoints. A collective on a
CPU tensor fails under NCCL ("No backend type associated with device type cpu"), and a
``float(loss)`` per micro-batch would stall the GPU on a device→host copy every time.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

from branchout.core.spec import TrainingSpec
from branchout.stages.prepare.instruct import model_inputs
from branchout.stages.training import kernels
from branchout.stages.training.ds_files import (
    import_deepspeed,
    read_state,
    safe_load,
    weights_only_loads,
    write_state,
)
from branchout.stages.training.optim import (
    EarlyEnd,
    build_optimizer,
    build_scheduler,
    lr_lambda,
    param_groups,
)

TAG = "state"  # the tag every DeepSpeed checkpoint here is saved under (``<checkpoint>/state/``)


class Engine(Protocol):
    device: Any  # where the model, the batches and every reduction tensor live

    def train_step(self, micro_batches: list) -> Any:
        """One optimizer step; returns this rank's mean loss as a 0-dim tensor on ``device``.

        A micro-batch is a tensor of token-stream blocks or an ``(ids, roles)`` pair of
        instruction rows (``stages.prepare.instruct.model_inputs``)."""

    def lr(self) -> float: ...
    def score(self, batches: list) -> Any: ...
    def save(self, path: str, client_state: dict[str, Any]) -> None: ...
    def load(self, path: str) -> dict[str, Any]: ...
    def state_dict_for_export(self) -> dict | None: ...


def decide_precision(job, use_gpu: bool, world: int = 1):
    """The job's precision on this worker's hardware, the same on every rank; returns
    ``(job with that precision, core.precision.Precision)``.

    ``auto`` is decided here, where the job runs (``core.precision``), not on the driver:
    a cluster can mix node types. Ranks of one job must agree (DeepSpeed's bf16 and fp32
    optimizers do not mix), so a multi-rank job takes bf16 only if every rank has it
    natively: one MIN all-reduce of a flag, on this rank's GPU under NCCL.
    """
    import torch

    from branchout.core.precision import agreed, decide, this_worker

    requested = job.spec().deepspeed.precision
    hw = this_worker(use_gpu)
    if requested == "auto" and world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
            flag = torch.tensor(int(hw.bf16), dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            hw = agreed(hw, bool(flag.item()))
    decision = decide(requested, hw)
    return job.with_precision(decision.used), decision


def training_dtype(precision: str):
    """The dtype a model trained at ``precision`` (a decided one: bf16, fp16, fp32) is exported in."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def deepspeed_config(t: TrainingSpec, world_size: int, use_gpu: bool, hidden_size: int | None = None) -> dict:
    """DeepSpeed's JSON config from the spec; ``deepspeed.config`` is merged last.

    ``hidden_size`` sizes ZeRO's communication buckets to the model, as transformers'
    Trainer does for its "auto" values (hidden², with a 16M-element floor here so that
    small models do not pay a collective per few layers): DeepSpeed's defaults are
    model-blind, and a reduce bucket of 5e8 elements is 1 GB of 16-bit buffer per rank.
    """
    from branchout.core.spec import deep_merge

    ds = t.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    bucket = max(hidden_size * hidden_size, 1 << 24) if hidden_size else None
    if bucket and ds.zero_stage in (2, 3):
        zero["reduce_bucket_size"] = bucket
    if ds.zero_stage in (1, 2):
        if bucket:
            zero["allgather_bucket_size"] = bucket  # the weights' gather after the step, in the same chunks
        # DeepSpeed's default all-reduces each gradient bucket whole (2Ψ) and each rank then
        # keeps its part: with the weights' all-gather, 3Ψ per step. Reducing each part to its
        # owner is the ZeRO paper's reduce-scatter, 2Ψ in all (tests/integration/test_comm_volume.py
        # counts it): a third less on the network.
        zero["use_multi_rank_bucket_allreduce"] = False
    if use_gpu and ds.zero_stage in (2, 3):
        # Reduce each bucket of gradients while the backward computes the next (a side CUDA
        # stream): ZeRO's 2Ψ-3Ψ per step then hides behind the step (cluster.interconnect).
        zero["overlap_comm"] = True
    if ds.zero_stage == 3:
        # Without this, save_16bit_model / export would write empty tensors under ZeRO-3.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if bucket:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * bucket)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
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


def model_hidden_size(model_or_config) -> int | None:
    """The width of a model (or its config), for ``deepspeed_config``'s bucket sizes."""
    config = getattr(model_or_config, "config", model_or_config)
    hidden = getattr(config, "hidden_size", None)
    return hidden if isinstance(hidden, int) else None


def skip_inference_comm_op() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce, which training never calls.

    On the CPU accelerator DeepSpeed's first ``init_distributed`` JIT-compiles
    ``deepspeed_shm_comm`` (measured 29 s on a 2-core machine, once per machine and per install
    path, then a ninja check and a load in every process). Only ``inference_all_reduce``
    (tensor-parallel inference) uses it; ZeRO's collectives go through the process group.
    DeepSpeed keeps its probe of compatible ops in one module-level dict whose edits persist
    (``deepspeed.ops.__getattr__``), and ``build_shm_op`` skips an op marked incompatible there.
    GPU accelerators have no such builder, so nothing is probed for them.
    """
    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """ZeRO 0-3 with optional offload, on an already-initialised process group (Ray Train).

    Build the model for ZeRO-3 under ``stages.training.model.zero3_construction`` so that no rank
    ever holds all of it.
    """

    def __init__(self, model, t: TrainingSpec, total_steps: int, world_size: int, use_gpu: bool):
        import types

        import torch

        deepspeed = import_deepspeed()

        skip_inference_comm_op()
        self.config = deepspeed_config(t, world_size, use_gpu, model_hidden_size(model))
        # DeepSpeed picks its GPU from LOCAL_RANK; Ray Train has already made this worker's
        # GPU current, and the two differ when a worker has several GPUs or Ray orders them
        # differently. Name the device Ray gave us.
        args = (types.SimpleNamespace(device_rank=torch.cuda.current_device())
                if use_gpu and torch.cuda.is_available() else None)
        self.early = EarlyEnd()  # pretrain.stop: the wsd schedule cools down from where it is decided
        self.kernels = kernels.decide(t, total_steps, "cuda" if use_gpu else "cpu", deepspeed=True)
        if self.kernels.liger:
            kernels.apply_liger(model)
        factor = lr_lambda(t.schedule, total_steps, self.early)
        if "optimizer" in self.config:

            def scheduler(opt):
                return torch.optim.lr_scheduler.LambdaLR(opt, factor)

            engine, _, _, _ = deepspeed.initialize(
                args=args, model=model, model_parameters=param_groups(model, t.optimizer.weight_decay),
                lr_scheduler=scheduler, config=self.config)
        else:
            optimizer = build_optimizer(model, t.optimizer, fused=self.kernels.fused_optimizer)
            engine, _, _, _ = deepspeed.initialize(
                args=args, model=model, optimizer=optimizer,
                lr_scheduler=build_scheduler(optimizer, t.schedule, total_steps, self.early), config=self.config)
        if self.kernels.compile:
            engine.compile()  # DeepSpeed's own: it compiles around its ZeRO hooks
        self.engine = engine
        self.device = engine.device
        self.zero_stage = t.deepspeed.zero_stage

    @property
    def module(self):
        """The trained module (partitioned under ZeRO-3: read its weights through the export)."""
        return self.engine.module

    def train_step(self, micro_batches: list):
        import torch

        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in micro_batches:
            loss = self.engine(**model_inputs(batch, self.device)).loss
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            total += loss.detach().float()
        return total / len(micro_batches)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def scale_lr(self, factor: float) -> None:
        """Every later learning rate × ``factor`` (a NaN rollback). The schedule's base rates
        are in its checkpointed state, so a resumed job keeps the lowered rate."""
        _scale_lr(self.engine.optimizer, self.engine.lr_scheduler, factor)

    def poison(self) -> None:
        """Fault injection: this rank's first trainable weights become NaN."""
        _poison(self.engine.module)

    def score(self, batches: list):
        """``[Σ token loss, tokens]`` of held-out ``batches``, on the engine's device, no gradients.
        Under ZeRO-3 every rank must call it with as many batches (each forward gathers)."""

        self.engine.eval()
        try:
            return score_batches(self.engine, batches, self.device, contextlib.nullcontext())
        finally:
            self.engine.train()

    def save(self, path: str, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(path, tag=TAG, client_state=client_state)

    def load(self, path: str) -> dict[str, Any]:
        # DeepSpeed's own loader unpickles anything (weights_only=False); checkpoints come
        # from shared storage, so its files are read through safe_load instead.
        self.engine.checkpoint_engine.load = safe_load
        _, client_state = self.engine.load_checkpoint(path, tag=TAG)
        return client_state or {}

    def load_universal(self, path: str) -> dict[str, Any]:
        """Load the universal checkpoint at ``path`` (``stages.training.reshard.to_universal``),
        written by any number of workers: each rank takes its own partitions of it."""
        self.engine.checkpoint_engine.load = safe_load
        # read at load time only (DeepSpeed's load_checkpoint and the optimizers' loaders)
        self.engine._config.load_universal_checkpoint = True
        try:
            with weights_only_loads():
                _, client_state = self.engine.load_checkpoint(path, tag=TAG)
        finally:
            self.engine._config.load_universal_checkpoint = False
        return client_state or {}

    def release_optimizer_state(self) -> None:
        """Drop the Adam moments once training is over and its last checkpoint is durable.

        They are 8 bytes per parameter (sharded under ZeRO), more than the 16-bit weights
        the export gathers next; nothing reads them again in this process.
        """
        import gc

        optimizer = self.engine.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO and bf16 wrappers hold the torch one
        if hasattr(inner, "state"):
            inner.state.clear()
        gc.collect()

    def state_dict_for_export(self) -> dict | None:
        """The 16-bit (training-dtype) weights on rank 0's host, None elsewhere.

        Every rank must call it: under ZeRO-3 DeepSpeed gathers one layer at a time into
        rank 0's state dict (``_zero3_consolidated_16bit_state_dict``; other ranks drop each
        layer again), so no rank ever holds the whole model twice. Below ZeRO-3 every rank
        already holds the 16-bit weights; rank 0 copies them to the host. For a LoRA model
        only the trainable (adapter) weights are exported.
        """
        import torch.distributed as dist

        module = self.engine.module
        adapters_only = hasattr(module, "peft_config")
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=adapters_only)
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        keep = {n for n, p in module.named_parameters() if p.requires_grad} if adapters_only else None
        return {k: v.detach().cpu() for k, v in module.state_dict().items() if keep is None or k in keep}


class TorchEngine:
    """A single process: AdamW, warmup-cosine, bf16 or fp16 autocast (fp16 with a loss
    scaler), gradient accumulation. ``t.deepspeed.precision`` is a decided one, never auto."""

    def __init__(self, model, t: TrainingSpec, total_steps: int, device: str = "cpu"):
        import torch

        self.kernels = kernels.decide(t, total_steps, device, deepspeed=False)
        if self.kernels.liger:
            kernels.apply_liger(model)
        if device.startswith("cuda") and t.deepspeed.precision in ("bf16", "fp16"):
            # a frozen base (LoRA) is only read: keep it in 16 bits on the GPU, adapters in fp32
            half = torch.bfloat16 if t.deepspeed.precision == "bf16" else torch.float16
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(half)
        self.model = model.to(device)
        self.device = device
        if self.kernels.compile:
            kernels.compile_layers(self.model)  # in place: parameter names, checkpoints and exports unchanged
        self.optimizer = build_optimizer(model, t.optimizer, fused=self.kernels.fused_optimizer)
        self.early = EarlyEnd()  # pretrain.stop: the wsd schedule cools down from where it is decided
        self.scheduler = build_scheduler(self.optimizer, t.schedule, total_steps, self.early)
        self.grad_clip = t.optimizer.grad_clip
        self.autocast = t.deepspeed.precision in ("bf16", "fp16")
        self.dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(t.deepspeed.precision)
        # fp16's narrow range underflows small gradients: scale the loss (what DeepSpeed's
        # fp16 engine does). bf16 has fp32's range and needs none; disabled, it is a no-op.
        self.scaler = torch.amp.GradScaler("cuda" if device.startswith("cuda") else "cpu",
                                           enabled=t.deepspeed.precision == "fp16")

    def train_step(self, micro_batches: list):
        import torch

        self.model.train()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        for batch in micro_batches:
            inputs = model_inputs(batch, self.device)
            with torch.autocast(device_type, dtype=getattr(torch, self.dtype or "bfloat16"), enabled=self.autocast):
                loss = self.model(**inputs).loss
            self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.detach().float()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)  # skipped (and the scale lowered) when fp16 overflowed
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(micro_batches)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def scale_lr(self, factor: float) -> None:
        """Every later learning rate × ``factor`` (a NaN rollback); kept in the schedule's state."""
        _scale_lr(self.optimizer, self.scheduler, factor)

    def poison(self) -> None:
        """Fault injection: the first trainable weights become NaN."""
        _poison(self.model)

    def score(self, batches: list):
        """``[Σ token loss, tokens]`` of held-out ``batches``, on the engine's device, no gradients."""
        import torch

        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        self.model.eval()
        try:
            autocast = torch.autocast(device_type, dtype=getattr(torch, self.dtype or "bfloat16"), enabled=self.autocast)
            return score_batches(self.model, batches, self.device, autocast)
        finally:
            self.model.train()

    def _trainable_state(self) -> dict:
        return {k: v for k, v in self.model.state_dict().items()
                if k in {n for n, p in self.model.named_parameters() if p.requires_grad}}

    def save(self, path: str, client_state: dict[str, Any]) -> None:
        write_state(path, self._trainable_state(), self.optimizer, self.scheduler, client_state,
                    self.scaler.state_dict())

    def load(self, path: str) -> dict[str, Any]:
        state = read_state(path, self.optimizer, self.scheduler, self.device)
        self.model.load_state_dict(state["model"], strict=False)
        if state.get("scaler"):  # empty unless the job trains in fp16
            self.scaler.load_state_dict(state["scaler"])
        return state["client_state"]

    def state_dict_for_export(self) -> dict | None:
        return None  # the model object itself is exported (save_pretrained handles peft too)


def _scale_lr(optimizer, scheduler, factor: float) -> None:
    # the schedule multiplies its base rates; the current rate is already in the param groups
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor


def _poison(module) -> None:
    import torch

    with torch.no_grad():
        p = next(p for p in module.parameters() if p.requires_grad)
        getattr(p, "ds_tensor", p).fill_(float("nan"))  # a ZeRO-3 rank holds its shard only


def score_batches(model, batches: list, device, autocast):
    """Held-out loss summed over the scored tokens, and their count, as one tensor on ``device``."""
    import torch

    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad(), autocast:
        for batch in batches:
            inputs = model_inputs(batch, device)
            scored = (inputs["labels"][:, 1:] != -100).sum()  # HF shifts: the first token is never a target
            total += torch.stack([model(**inputs).loss.double() * scored, scored.double()])
    return total
