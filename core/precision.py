"""Which number format a job trains and scores in: ``precision: auto`` follows the hardware.

bf16 halves the bytes of weights, gradients and activations and, on hardware with bf16
units, runs matmuls two to ten times faster than fp32. On hardware without them torch
*emulates* bf16, and it is far slower than fp32: measured on an AVX2-only 2-core EPYC,
one-thread 512×512 matmuls ran 77.5 GFLOP/s in fp32 and 1.3 in bf16 (also under
``torch.autocast``), and the quickstart's pretrain 13× slower. So a default that assumes
bf16 is a default that some users' machines (laptops, many cloud VMs, CI) cannot afford.

The rule (``decide``), per job and on the machine the job runs on, since one cluster can
mix node types:

    hardware                                      auto →
    CUDA/ROCm device with bf16 (Ampere and later) bf16
    CUDA device without it (V100, T4, …)          fp16, with loss scaling
    CPU with AVX512-BF16 or AMX (x86), BF16 (Arm) bf16
    any other CPU                                 fp32

An explicit ``bf16``/``fp32``/``fp16`` is used as given; an explicit bf16 on hardware
that would emulate it gets a one-line warning, since it runs but many times slower.

A CPU's bf16 is native only when the CPU has the instructions *and* torch's oneDNN
kernels may use them: ``ONEDNN_MAX_CPU_ISA=AVX2`` (or an older oneDNN) makes an
AVX512-BF16 machine emulate bf16 exactly like an AVX2 one, and ``decide`` must then say
fp32 too. Both are read: ``/proc/cpuinfo``'s flags, then oneDNN's own check.

``predict`` is the same rule at plan time, for the hardware the plan can know: this
machine's CPU or GPU for an embedded run, the GPU type named by
``resources_per_worker.accelerator``. Elsewhere the plan says the worker decides.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal

Device = Literal["cpu", "cuda"]

# /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 (Cooper Lake, Zen 4 and
# later) or AMX (Sapphire Rapids and later); Arm's "bf16" feature (Graviton 3, Neoverse V1).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

# GPUs by Ray's accelerator type (core.accelerators): bf16 needs compute capability 8.0
# (Ampere) on NVIDIA; AMD's CDNA2/3 have it. The ones named here do not.
GPUS_WITHOUT_BF16 = frozenset({"T4", "V100", "P100", "P4", "K80", "M60"})


@dataclass(frozen=True)
class Hardware:
    """What a job runs on, as far as precision cares."""

    device: Device
    name: str  # "NVIDIA H100 80GB HBM3", "AMD EPYC" (the CPU's model name)
    bf16: bool  # native bf16 arithmetic (not torch's emulation)
    why: str  # the evidence, for the reason line: "has AVX512-BF16", "has no AVX512-BF16 or AMX"


@dataclass(frozen=True)
class Precision:
    """The precision a job uses and why; recorded in its result and shown to the user."""

    requested: str  # auto | bf16 | fp16 | fp32, as the spec says
    used: str  # bf16 | fp16 | fp32
    reason: str
    warning: str | None = None  # an explicit setting the hardware will run slowly

    def line(self) -> str:
        """``auto → fp32 (CPU AMD EPYC has no AVX512-BF16 or AMX: bf16 would be emulated)``."""
        head = f"auto → {self.used}" if self.requested == "auto" else self.used
        return f"{head} ({self.reason})"

    def as_dict(self) -> dict:
        return asdict(self)


def decide(requested: str, hw: Hardware) -> Precision:
    """The precision a job asking for ``requested`` uses on ``hw``."""
    where = f"{'GPU' if hw.device == 'cuda' else 'CPU'} {hw.name}"
    if requested != "auto":
        warning = None
        if requested == "bf16" and not hw.bf16:
            faster = "fp16" if hw.device == "cuda" else "fp32"
            warning = (f"precision bf16 on {where}, which {hw.why}: torch emulates bf16 there, many times "
                       f"slower than {faster} (set deepspeed.precision: auto or {faster})")
        return Precision(requested, requested, "as configured", warning)
    if hw.bf16:
        return Precision("auto", "bf16", f"{where} {hw.why}")
    if hw.device == "cuda":
        return Precision("auto", "fp16", f"{where} {hw.why}: fp16 with loss scaling")
    return Precision("auto", "fp32", f"{where} {hw.why}: bf16 would be emulated, many times slower")


def cpu_hardware(cpuinfo: str | None = None, onednn_bf16: bool | None = None) -> Hardware:
    """This machine's CPU. ``cpuinfo`` (the text of ``/proc/cpuinfo``) and ``onednn_bf16``
    (whether torch's oneDNN may use bf16 instructions) are read from the machine when None;
    tests pass them to stand for other machines."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read(1 << 20)  # one core's block is enough; a host with 256 cores is ~1 MB
        except OSError:
            cpuinfo = ""  # not Linux: nothing says bf16 is native, so it is not assumed
    flags, name = _cpu_flags(cpuinfo)
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if not found:
        return Hardware("cpu", name, False, "has no AVX512-BF16 or AMX" if flags else "reports no bf16 instructions")
    label = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX", "bf16": "BF16"}[found[0]]
    if onednn_bf16 is None:
        onednn_bf16 = _onednn_bf16()
    if not onednn_bf16:
        limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
        return Hardware("cpu", name, False, f"has {label} but torch's oneDNN may not use it"
                        + (f" (ONEDNN_MAX_CPU_ISA={limit})" if limit else ""))
    return Hardware("cpu", name, True, f"has {label}")


def _cpu_flags(cpuinfo: str) -> tuple[set[str], str]:
    """(flags of the first core, model name) from /proc/cpuinfo text (x86 ``flags``, Arm ``Features``)."""
    flags: set[str] = set()
    name = "(unknown model)"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "model name" and name == "(unknown model)":
            name = value.strip() or name
    return flags, name


def _onednn_bf16() -> bool:
    """torch's own check that its oneDNN kernels may run bf16 (it honours ONEDNN_MAX_CPU_ISA)."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # an old torch or a build without oneDNN: trust the flags
        return True


def gpu_hardware() -> Hardware:
    """The current CUDA (or ROCm) device of this process."""
    import torch

    name = torch.cuda.get_device_name()
    if torch.version.hip:
        ok = torch.cuda.is_bf16_supported()
        return Hardware("cuda", name, ok, "supports bf16" if ok else "has no bf16")
    major, minor = torch.cuda.get_device_capability()
    ok = major >= 8
    return Hardware("cuda", name, ok, f"{'supports' if ok else 'has no'} bf16 (compute capability {major}.{minor})")


def this_worker(use_gpu: bool) -> Hardware:
    """The hardware this process trains on: its GPU when the job has one, else its CPU."""
    return gpu_hardware() if use_gpu else cpu_hardware()


def agreed(hw: Hardware, bf16_everywhere: bool) -> Hardware:
    """``hw`` as the whole worker group sees it: bf16 only if every rank has it natively
    (ranks of one job must use one precision, and a mixed cluster may place them apart)."""
    if hw.bf16 and not bf16_everywhere:
        return Hardware(hw.device, hw.name, False, "has bf16 but another worker of the job has not")
    return hw


def predict(requested: str, uses_gpu: bool, accelerator: str | None, embedded: bool) -> Precision | None:
    """What ``decide`` will say on the job's workers, when the plan can know; None otherwise.

    The plan knows this machine (an embedded run's workers run here) and a GPU type named by
    ``resources_per_worker.accelerator``. Simulated GPUs (``BRANCHOUT_SIMULATE_GPUS``) train
    on this machine's CPU.
    """
    from branchout.core.accelerators import ray_accelerator_type

    simulated = os.environ.get("BRANCHOUT_SIMULATE_GPUS", "") not in ("", "0")
    if uses_gpu and not simulated:
        if accelerator:
            kind = ray_accelerator_type(accelerator)
            ok = kind not in GPUS_WITHOUT_BF16
            return decide(requested, Hardware("cuda", accelerator, ok, "supports bf16" if ok else "has no bf16"))
        if embedded and _has_cuda():
            return decide(requested, gpu_hardware())
        return None if requested == "auto" else Precision(requested, requested, "as configured")
    if embedded:
        return decide(requested, cpu_hardware())
    if requested != "auto":
        return Precision(requested, requested, "as configured")
    return None


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


UNDECIDED = ("auto: decided on each worker (bf16 where its GPU or CPU does bf16 natively, "
             "else fp16 on a GPU, fp32 on a CPU)")
