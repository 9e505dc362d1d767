"""The memory planner: per-GPU memory of a training job under ZeRO 0-3, with and without offload.

Model states follow DeepSpeed's own accounting (``estimate_zero2_model_states_mem_needs`` /
``estimate_zero3_model_states_mem_needs``; the tests compare against those functions):
with mixed precision a parameter costs 2 bytes of 16-bit weights, 2 of 16-bit gradients
and 16 of fp32 state (4 weights, 4 gradients, 8 Adam moments). ZeRO-1 partitions the fp32
state over the data-parallel GPUs, ZeRO-2 also the 16-bit gradients, ZeRO-3 also the
16-bit weights (each GPU then gathers one layer at a time: ``4 × largest layer``).
Offload moves the fp32 state (and, ZeRO-3 only, the weights) to host memory.

``paper_model_states`` is the ZeRO paper's simpler accounting (K = 12, no fp32 gradient
buffer), kept to check the worked example (7.5B parameters on 64 GPUs: 120 / 31.4 / 16.6
/ 1.9 GB).

Activations: ``34 · s · b · h`` bytes per layer with 16-bit activations and fused
attention (Korthikanti et al. 2022, no recomputation), plus the logits ``6 · s · b · V``
(16-bit logits and their fp32 copy for the loss).
"""

from __future__ import annotations

from dataclasses import dataclass

from branchout.core.accelerators import RAY_ACCELERATOR_TYPES, ray_accelerator_type  # noqa: F401  (re-exported)

GB = 1e9
GiB = 1 << 30

# Nominal device memory in GB as vendors state it.
GPUS: dict[str, float] = {
    "T4-16GB": 16, "V100-16GB": 16, "V100-32GB": 32, "A10G-24GB": 24, "L4-24GB": 24,
    "RTX4090-24GB": 24, "A100-40GB": 40, "L40S-48GB": 48, "A100-80GB": 80, "H100-80GB": 80,
    "H200-141GB": 141, "B200-192GB": 192, "MI300X-192GB": 192,
}
USABLE_FRACTION = 0.9  # allocator fragmentation and workspaces
CONTEXT_BYTES = 1 * GiB  # CUDA context and NCCL buffers


@dataclass(frozen=True)
class ZeroOption:
    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def label(self) -> str:
        off = "+offload(opt,params)" if self.offload_params else "+offload(opt)" if self.offload_optimizer else ""
        return f"ZeRO-{self.stage}{off}"


# Cheapest first: less communication and no PCIe traffic come before memory savings.
OPTIONS = [ZeroOption(0), ZeroOption(1), ZeroOption(2), ZeroOption(3),
           ZeroOption(2, True), ZeroOption(3, True), ZeroOption(3, True, True)]


@dataclass
class Estimate:
    option: ZeroOption
    model_states: float  # bytes per GPU
    activations: float  # bytes per GPU
    cpu_per_node: float  # bytes of host memory per node for offloaded state
    budget: float  # usable bytes per GPU

    @property
    def total(self) -> float:
        return self.model_states + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def model_states(option: ZeroOption, params: int, largest_layer: int, gpus: int,
                 mixed_precision: bool = True) -> float:
    """Bytes of parameters, gradients and optimizer state per GPU (DeepSpeed's accounting).

    Mixed precision: 2 (16-bit weights) + 2 (16-bit grads) + 16 (fp32 weights, grads, Adam
    m and v) per parameter; ZeRO-2/3 shard 18 of them as DeepSpeed's estimators do. fp32
    training keeps 4 + 4 + 8.
    """
    n = max(1, gpus)
    w, g, st = (2, 2, 16) if mixed_precision else (4, 4, 8)
    if option.stage == 3:
        gathered = 4 * largest_layer  # one layer's full weights at a time
        if option.offload_params:
            return gathered
        if option.offload_optimizer:
            return gathered + w * params / n
        return gathered + (g + st) * params / n
    if option.offload_optimizer:  # ZeRO-1/2 + offload: only the 16-bit weights stay on the GPU
        return w * params
    if option.stage == 2:
        return w * params + (g + st) * params / n
    if option.stage == 1:
        return (w + g) * params + st * params / n
    return (w + g + st) * params


def cpu_memory_per_node(option: ZeroOption, params: int, gpus_per_node: int, nodes: int,
                        buffer_factor: float = 1.5) -> float:
    """Host memory for offloaded state, as DeepSpeed estimates it (zero_init for ZeRO-3)."""
    total_gpus = gpus_per_node * nodes
    if not option.offload_optimizer:
        return 0.0
    if option.stage == 3:
        per = 18 if option.offload_params else 16
        return params * per / nodes * buffer_factor
    return params * max(4 * total_gpus, 16) * buffer_factor


def paper_model_states(params: int, gpus: int, stage: int) -> float:
    """The ZeRO paper's accounting (§3, K = 12): 2Ψ + 2Ψ + 12Ψ, partitioned by stage."""
    n = max(1, gpus)
    weights = 2 * params / (n if stage >= 3 else 1)
    grads = 2 * params / (n if stage >= 2 else 1)
    state = 12 * params / (n if stage >= 1 else 1)
    return weights + grads + state


def activation_bytes(seq_len: int, micro_batch: int, hidden: int, layers: int, vocab: int,
                     mixed_precision: bool = True, checkpointed: bool = False) -> float:
    """Activations kept for backward: ~34·s·b·h bytes per layer in 16-bit (Korthikanti et
    al.), plus the logits. With activation checkpointing only each layer's input (2·s·b·h)
    is kept and one layer's full set is rebuilt at a time."""
    scale = 1 if mixed_precision else 2
    per_layer = 34 * seq_len * micro_batch * hidden * scale
    kept = (2 * seq_len * micro_batch * hidden * scale * layers + per_layer) if checkpointed else per_layer * layers
    return kept + 6 * seq_len * micro_batch * vocab


def usable_bytes(gpu_memory_gb: float) -> float:
    return gpu_memory_gb * GB * USABLE_FRACTION - CONTEXT_BYTES


def plan_memory(params: int, largest_layer: int, gpus: int, gpus_per_node: int, seq_len: int,
                micro_batch: int, hidden: int, layers: int, vocab: int, gpu_memory_gb: float,
                mixed_precision: bool = True) -> list[Estimate]:
    """Every option with its per-GPU memory and whether it fits, cheapest first."""
    nodes = max(1, -(-gpus // max(1, gpus_per_node)))
    acts = activation_bytes(seq_len, micro_batch, hidden, layers, vocab, mixed_precision)
    budget = usable_bytes(gpu_memory_gb)
    return [Estimate(o, model_states(o, params, largest_layer, gpus, mixed_precision), acts,
                     cpu_memory_per_node(o, params, min(gpus, gpus_per_node), nodes), budget)
            for o in OPTIONS]


def largest_micro_batch(option: ZeroOption, params: int, largest_layer: int, gpus: int, seq_len: int,
                        per_worker_batch: int, hidden: int, layers: int, vocab: int, gpu_memory_gb: float,
                        mixed_precision: bool = True) -> int | None:
    """The largest micro-batch that divides ``per_worker_batch`` (a worker's blocks per step)
    and fits ``option`` on GPUs of ``gpu_memory_gb``; None when not even 1 fits.

    Fewer, larger micro-batches are the same optimizer step in fewer, larger kernels: on a
    GPU a 1024-wide model at micro-batch 8 leaves its matmuls too small to fill the chip.
    """
    states = model_states(option, params, largest_layer, gpus, mixed_precision)
    budget = usable_bytes(gpu_memory_gb)
    for micro in sorted((m for m in range(1, per_worker_batch + 1) if per_worker_batch % m == 0), reverse=True):
        if states + activation_bytes(seq_len, micro, hidden, layers, vocab, mixed_precision) <= budget:
            return micro
    return None


def pick(estimates: list[Estimate]) -> Estimate | None:
    """The cheapest option that fits, or None when nothing does."""
    return next((e for e in estimates if e.fits), None)


def gpu_memory_gb(name: str) -> float:
    """Memory of a named GPU.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (or give --gpu-mem GiB)") from None


def inference_bytes(params: int, seq_len: int, batch: int, hidden: int, vocab: int,
                    bytes_per_param: int = 2) -> float:
    """Scoring one model: its weights, one layer's activations (nothing is kept for a
    backward pass) and the logits with their fp32 copy for the loss."""
    return bytes_per_param * params + 34 * seq_len * batch * hidden + 6 * seq_len * batch * vocab
