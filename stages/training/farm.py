"""The adapter farm: many domains' LoRA adapters trained together on one frozen base.

A farm holds the base model once, in one process, and any number of *members*: LoRA
domains that share the base, the block length and the precision. Each optimizer step takes
every member's micro-batches, concatenates their rows, and runs each base layer once for
all of them; an adapted layer (``_bank_class``) then adds each member's own low-rank update
to that member's rows only (a loop over row segments: a farm's members are few and
their segments large, so one small matmul pair per member costs little beside the base's
one large matmul).

Nothing couples the members. Rows never mix in a causal LM (attention, norms and MLPs are
per row), each member's loss is the mean over its own tokens, and the summed loss's
gradient with respect to one member's adapter is exactly that member's own gradient. Each
member has its own AdamW, learning-rate schedule, gradient clipping, accumulation and step
count, and leaves the farm when it is done; a member whose loss is not finite is taken
out without touching the others (its rows' NaN flows back only through its own adapter).

A member's adapter is initialised, named and stored as a lone LoRA job's is
(``init_lora``: a seeded generator per job, peft's distribution; its state dict uses peft's
parameter names, its optimizer state peft's parameter order), so a member's checkpoint
resumes as a lone job and a lone job's as a member, and a member's exported adapter
loads with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from branchout.core.spec import FinetuneOptions


def lora_targets(model, targets: list[str]) -> list[str]:
    """Names of the modules a LoRA config adapts, in module order (peft's suffix match)."""
    return [name for name, _ in model.named_modules()
            if any(name == t or name.endswith("." + t) for t in targets)]


def init_lora(shapes: list[tuple[int, int]], rank: int, seed: int) -> list[tuple[Any, Any]]:
    """A job's initial adapter, layer by layer: A as peft draws it (Kaiming-uniform, a=√5)
    from a generator seeded by the job alone, B zero (the adapter starts as the identity).
    ``shapes``: (in_features, out_features) of each adapted layer, in module order."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = []
    for fan_in, fan_out in shapes:
        a = torch.empty(rank, fan_in)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        out.append((a, torch.zeros(fan_out, rank)))
    return out


def seed_peft_adapter(model, seed: int) -> None:
    """Give a peft LoRA model (adapter "default") the initial adapter ``init_lora`` draws, so
    a lone job and a farm member start from the same weights."""
    import torch

    layers = [m for _, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    rank = layers[0].lora_A["default"].out_features
    weights = init_lora([(m.lora_A["default"].in_features, m.lora_B["default"].out_features) for m in layers],
                        rank, seed)
    with torch.no_grad():
        for m, (a, b) in zip(layers, weights, strict=True):
            m.lora_A["default"].weight.copy_(a)
            m.lora_B["default"].weight.copy_(b)


def _bank_class():
    import torch

    class _LoraBank(torch.nn.Module):
        """A frozen linear layer plus one LoRA adapter per member, each applied to its rows.

        ``segments`` (set by the farm before each forward): ``[(member, rows), ...]`` in row
        order, covering the batch.
        """

        def __init__(self, base: torch.nn.Linear):
            super().__init__()
            self.base_layer = base
            self.lora_A = torch.nn.ParameterDict()
            self.lora_B = torch.nn.ParameterDict()
            self.scaling: dict[str, float] = {}
            self.segments: list[tuple[str, int]] = []

        def forward(self, x):
            y = self.base_layer(x)
            deltas, start = [], 0
            for member, rows in self.segments:
                part = x[start:start + rows]
                a, b = self.lora_A[member], self.lora_B[member]
                # peft's order of operations: B(A(x)) · scaling, in the adapter's dtype
                deltas.append((part.to(a.dtype) @ a.t() @ b.t()) * self.scaling[member])
                start += rows
            if start != x.shape[0]:
                raise RuntimeError(f"farm: segments cover {start} rows of {x.shape[0]}")
            return y + torch.cat(deltas).to(y.dtype)

    return _LoraBank


@dataclass
class Member:
    """One domain in the farm: its own data order, optimizer, schedule and step."""

    name: str
    options: FinetuneOptions  # method lora; its seq_len decided
    blocks: np.ndarray  # [n, seq_len] training blocks
    roles: np.ndarray | None = None  # instruction data: token roles, row for row
    step: int = 0
    optimizer: Any = None
    scheduler: Any = None
    params: list = field(default_factory=list)  # peft's parameter order: per layer, A then B
    order: Any = None  # stages.training.batches.BlockOrder

    @property
    def done(self) -> bool:
        return self.step >= self.options.steps


class Farm:
    """The base model (frozen, shared) and its members' adapters.

    ``targets``: the module names every member adapts (members of one farm share them:
    a member's rank, alpha and learning rate are its own).
    """

    def __init__(self, model, targets: list[str], device: str = "cpu", precision: str = "fp32",
                 rows_per_forward: int | None = None):
        import torch

        # None: every member's micro-batch in one forward (a GPU wants the large batch); a
        # number bounds the activations held at once to about that many rows' worth
        self.rows_per_forward = rows_per_forward
        self.device = device
        self.autocast = precision in ("bf16", "fp16")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.bfloat16)
        if precision == "fp16":
            raise ValueError("farm: fp16 needs a loss scaler per member; train fp16 LoRA domains alone")
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        for p in model.parameters():
            p.requires_grad_(False)
            if device.startswith("cuda") and half is not None:
                # the frozen base is only read: 16 bits on a GPU, as a lone LoRA job keeps it
                # (stages.training.engine.TorchEngine); the adapters stay fp32
                p.data = p.data.to(half)
        bank = _bank_class()
        self.layers: dict[str, Any] = {}
        for name in lora_targets(model, targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = bank(getattr(parent, child))
            setattr(parent, child, layer)
            self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"farm: no module matches the LoRA targets {targets}")
        self.model = model.to(device)
        self.members: dict[str, Member] = {}

    # ---- membership ------------------------------------------------------------

    def add(self, member: Member) -> None:
        """Admit ``member``: its adapter as a lone job would start it, its optimizer and schedule."""
        import torch

        from branchout.stages.training.batches import BlockOrder
        from branchout.stages.training.kernels import fused_optimizer
        from branchout.stages.training.optim import adamw, build_scheduler

        o = member.options
        if member.name in self.members:
            raise ValueError(f"farm: {member.name} is already a member")
        if o.method != "lora" or o.lora.dropout:
            # dropout would draw its masks from one shared stream: a member's result would
            # depend on its neighbours. Such a domain trains alone.
            raise ValueError(f"farm: {member.name} is not a LoRA job without dropout; it trains alone")
        shapes = [(layer.base_layer.in_features, layer.base_layer.out_features) for layer in self.layers.values()]
        member.params = []
        for layer, (a, b) in zip(self.layers.values(), init_lora(shapes, o.lora.rank, o.seed), strict=True):
            layer.lora_A[_key(member.name)] = torch.nn.Parameter(a.to(self.device))
            layer.lora_B[_key(member.name)] = torch.nn.Parameter(b.to(self.device))
            layer.scaling[_key(member.name)] = o.lora.alpha / o.lora.rank
            member.params += [layer.lora_A[_key(member.name)], layer.lora_B[_key(member.name)]]
        # every adapter weight is a matrix: one decayed group, as param_groups makes for a lone job
        member.optimizer = adamw([{"params": member.params, "weight_decay": o.optimizer.weight_decay}],
                                 o.optimizer, fused_optimizer(o.optimizer, self.device))
        member.scheduler = build_scheduler(member.optimizer, o.schedule, o.steps)
        member.order = BlockOrder(len(member.blocks), o.seed)
        self.members[member.name] = member

    def remove(self, name: str) -> Member:
        """Take a member out (done, diverged, or its data failed); the others go on."""
        member = self.members.pop(name)
        for layer in self.layers.values():
            del layer.lora_A[_key(name)], layer.lora_B[_key(name)]
            layer.scaling.pop(_key(name))
        return member

    # ---- training ---------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One optimizer step of every member not yet done; returns each one's loss (the mean
        of its micro-batches' losses, as a lone job's). A member whose loss is not finite
        gets no update; the caller takes it out."""
        import torch

        from branchout.stages.training.batches import step_micro_batches

        active = [m for m in self.members.values() if not m.done]
        if not active:
            return {}
        micro = {m.name: [self._batch(m, idx) for idx in step_micro_batches(
            m.order, m.step, m.options.global_batch_size, m.options.micro_batch_size, 0, 1)] for m in active}
        losses = {m.name: torch.zeros((), device=self.device) for m in active}
        self.model.train()
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        # accumulation round r: micro-batch r of every member that has one, in forwards of at
        # most rows_per_forward rows (a member's micro-batch is never split)
        for r in range(max(len(v) for v in micro.values())):
            members = [m for m in active if r < len(micro[m.name])]
            for group in self._groups(members, [micro[m.name][r] for m in members]):
                self._forward_backward(group, micro, r, losses, device_type)
        read = torch.stack([losses[m.name] / len(micro[m.name]) for m in active]).tolist()  # one read
        out = {}
        for m, loss in zip(active, read, strict=True):
            out[m.name] = loss
            if math.isfinite(loss):
                if m.options.optimizer.grad_clip:
                    torch.nn.utils.clip_grad_norm_(m.params, m.options.optimizer.grad_clip)
                m.optimizer.step()
                m.scheduler.step()
                m.step += 1
            m.optimizer.zero_grad(set_to_none=True)
        return out

    def _groups(self, members: list[Member], batches: list) -> list[list[Member]]:
        if self.rows_per_forward is None:
            return [members]
        groups, rows = [[]], 0
        for m, b in zip(members, batches, strict=True):
            n = (b[0] if isinstance(b, tuple) else b).shape[0]
            if groups[-1] and rows + n > self.rows_per_forward:
                groups.append([])
                rows = 0
            groups[-1].append(m)
            rows += n
        return groups

    def _forward_backward(self, members: list[Member], micro: dict, r: int, losses: dict, device_type: str) -> None:
        """One forward and backward of micro-batch ``r`` of ``members``, their rows concatenated."""
        import torch

        from branchout.stages.prepare.instruct import model_inputs

        inputs = [model_inputs(micro[m.name][r], self.device) for m in members]
        rows = [i["input_ids"].shape[0] for i in inputs]
        for layer in self.layers.values():
            layer.segments = [(_key(m.name), n) for m, n in zip(members, rows, strict=True)]
        ids = torch.cat([i["input_ids"] for i in inputs])
        labels = torch.cat([i["labels"] for i in inputs])
        # instruction rows mask their padding; a packed block attends everywhere (all ones)
        mask = torch.cat([i.get("attention_mask", torch.ones_like(i["input_ids"])) for i in inputs]) \
            if any("attention_mask" in i for i in inputs) else None
        with torch.autocast(device_type, dtype=self.dtype, enabled=self.autocast):
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        per_token = _token_losses(logits, labels)
        total, start = 0.0, 0
        for m, n in zip(members, rows, strict=True):
            scored = (labels[start:start + n, 1:] != -100).sum()
            loss = per_token[start:start + n].sum() / scored.clamp(min=1)
            total = total + loss / len(micro[m.name])  # each member's own accumulation
            losses[m.name] += loss.detach()
            start += n
        total.backward()

    def _batch(self, m: Member, idx: np.ndarray):
        import torch

        idx = np.sort(idx)  # as the lone loop reads them
        ids = torch.from_numpy(m.blocks[idx].astype(np.int64))
        return ids if m.roles is None else (ids, torch.from_numpy(m.roles[idx].astype(np.int64)))

    def poison(self, name: str) -> None:
        """Make a member's next loss non-finite (fault injection: ``stages.training.faults``)."""
        import torch

        with torch.no_grad():
            for p in self.members[name].params:
                p.fill_(float("nan"))

    # ---- what a lone job would hold ----------------------------------------------

    def load_adapter(self, name: str, state: dict) -> None:
        """Set a member's adapter from ``adapter_state``'s form (a checkpoint of it, or a lone job's)."""
        import torch

        expected = self.adapter_state(name)
        if set(state) != set(expected):
            raise ValueError(f"farm: {name}'s checkpoint holds other adapter tensors than its LoRA config makes")
        with torch.no_grad():
            for layer_name, layer in self.layers.items():
                for ab in ("A", "B"):
                    getattr(layer, f"lora_{ab}")[_key(name)].copy_(
                        state[f"base_model.model.{layer_name}.lora_{ab}.default.weight"])

    def adapter_state(self, name: str) -> dict:
        """The member's adapter under peft's parameter names (``…q_proj.lora_A.default.weight``)."""
        return {f"base_model.model.{layer_name}.lora_{ab}.default.weight": getattr(layer, f"lora_{ab}")[_key(name)]
                .detach().cpu().clone() for layer_name, layer in self.layers.items() for ab in ("A", "B")}


def _key(name: str) -> str:
    """A member's name as a ParameterDict key (no dots; "finetune/legal" → "finetune|legal")."""
    return name.replace(".", "·").replace("/", "|")


def _token_losses(logits, labels):
    """Each predicted token's cross-entropy ([rows, seq_len - 1]; 0 where the label is -100),
    in fp32 as transformers computes a causal LM's loss."""
    import torch

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    flat = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             shift_labels.reshape(-1), ignore_index=-100, reduction="none")
    return flat.view(shift_labels.shape)
