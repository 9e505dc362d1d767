"""What data-parallel training sends between GPUs per optimizer step, and how long that takes.

A test machine has one GPU at most, so multi-GPU step time is *predicted*, never measured
here: a single-GPU step that was measured (``benchmarks/gpu.py``, or a job's own log) plus
the communication ZeRO's theory says each stage needs, over the accelerator type's nominal
links. The volume side is checked: ``tests/integration/test_comm_volume.py`` counts the bytes
that pass through the process group on 2 ranks and compares them with ``step_volume``.

Volume, in the ZeRO paper's units (Rajbhandari et al. 2020, §7; a ring all-reduce moves 2Ψ
per rank, a reduce-scatter or an all-gather Ψ, Ψ = the model's bytes in the communication
dtype): data parallel (ZeRO-0) and ZeRO-1/2 move 2Ψ per step (gradients reduced, updated
weights gathered; branchout has DeepSpeed reduce each gradient part to its owner, which
its default, an all-reduce of whole buckets, would make 3Ψ), ZeRO-3 3Ψ (weights gathered
again for the backward). DeepSpeed keeps a ZeRO-3 layer gathered from its forward to its
backward while fewer parameters than ``stage3_max_live_parameters`` are live and fewer than
``stage3_max_reuse_distance`` are touched in between (1e9 each by default): a model below
that gathers once per step, 2Ψ, and holds all its weights during the step.
"""

from __future__ import annotations

from dataclasses import dataclass

# DeepSpeed's defaults of stage3_max_live_parameters and stage3_max_reuse_distance (parameters)
REUSE_DISTANCE = 1_000_000_000


@dataclass(frozen=True)
class Links:
    """Nominal per-GPU bandwidth, one direction, bytes/s: vendors' figures, not measurements."""

    intra_node: float  # NVLink (or PCIe where the GPU has no NVLink)
    inter_node: float  # the network each GPU gets in a typical cluster of that GPU


# NVLink per direction: A100 300 GB/s, H100/H200 450 GB/s, B200 900 GB/s; PCIe Gen4 x16 ~25
# GB/s usable; between nodes 400 Gb/s (50 GB/s) per GPU on H100/H200/B200 clusters, 200 Gb/s
# on A100 clusters, 100 Gb/s for PCIe-class cloud GPUs.
LINKS: dict[str, Links] = {
    "A100": Links(300e9, 25e9), "H100": Links(450e9, 50e9), "H200": Links(450e9, 50e9),
    "B200": Links(900e9, 50e9), "L4": Links(25e9, 12.5e9), "A10G": Links(25e9, 12.5e9),
    "L40S": Links(25e9, 12.5e9), "T4": Links(12e9, 12.5e9), "V100": Links(150e9, 12.5e9),
    "RTX4090": Links(25e9, 12.5e9), "MI300X": Links(448e9, 50e9),
}


def links(accelerator: str) -> Links | None:
    """The links of a GPU named as in ``cluster.gpu_memory.GPUS`` ("H100-80GB") or bare ("H100")."""
    return LINKS.get(accelerator.split("-")[0])


def step_volume(stage: int, params: int, bytes_per_element: int, reuse_distance: int = REUSE_DISTANCE) -> float:
    """Bytes one rank sends per optimizer step (ZeRO paper units, see the module docstring)."""
    psi = params * bytes_per_element
    if stage == 3 and params > reuse_distance:
        return 3 * psi
    return 2 * psi


@dataclass(frozen=True)
class StepPrediction:
    gpus: int
    volume: float  # bytes per rank per step (paper units)
    comm_s: float  # that volume over the slowest link a ring crosses
    overlapped_s: float  # communication hidden behind compute (overlap_comm): max of the two
    serial_s: float  # none hidden: their sum


def predict_step(single_step_s: float, stage: int, params: int, bytes_per_element: int, gpus: int,
                 gpus_per_node: int, accelerator: str) -> StepPrediction | None:
    """A data-parallel step on ``gpus`` GPUs, each doing the single-GPU step's work (the global
    batch grows with them), predicted from a measured ``single_step_s``; None for an unknown GPU.

    A ring's collective moves ``(n-1)/n`` of the volume through each rank's link, and runs at
    the pace of the slowest link in the ring: the network once it spans nodes.
    """
    link = links(accelerator)
    if link is None:
        return None
    if gpus <= 1:
        return StepPrediction(gpus, 0.0, 0.0, single_step_s, single_step_s)
    volume = step_volume(stage, params, bytes_per_element)
    bandwidth = link.intra_node if gpus <= gpus_per_node else link.inter_node
    comm = volume * (gpus - 1) / gpus / bandwidth
    return StepPrediction(gpus, volume, comm, max(single_step_s, comm), single_step_s + comm)
