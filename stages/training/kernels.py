"""What makes a training step fast on a GPU, decided where the job runs.

Three switches of the training spec, each measured on its own in ``benchmarks/gpu.py``
(an ablation of the 171M pretrain on an H200, in benchmarks/RESULTS.md):

- ``optimizer.fused``: torch's fused AdamW, one kernel for every parameter instead of a
  few per tensor. On by default on a GPU; CPUs keep the multi-tensor (foreach) step they
  were measured with.
- ``compile``: ``torch.compile`` of each decoder layer, in place (``nn.Module.compile``), as
  torchtitan compiles per block: every layer has the same code, so one compiled graph
  serves them all, the compile takes seconds per layer shape rather than per model, and the
  weights keep their names (checkpoints and exports are unchanged). On by default only
  where it pays: a GPU, the plain engine, and a job long enough to repay the compile
  (``COMPILE_MIN_STEPS``). Under DeepSpeed it is opt-in (``compile: true``), through
  DeepSpeed's own ``engine.compile``, which knows its ZeRO hooks.
- ``fused_kernels``: Liger's Triton kernels (fused linear cross-entropy: the logits are
  never materialised; RMSNorm, SwiGLU, RoPE) for the architectures Liger supports. Liger is
  not a dependency of branchout (it needs Triton and a GPU), and it is off unless asked for:
  on an H200 (torch 2.11, Triton 3.6, liger-kernel 0.8.5) with compiled layers it halved the
  step rate, its kernels failing to trace under ``torch.compile``; inductor already fuses what
  Liger fuses there. ``true`` without the package is an error on the worker.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

# On the H200 the compile made the first step 33 s longer and each later step of the 171M
# pretrain (micro-batch 8) 0.07 s shorter: it paid for itself after ~480 steps. A shorter
# job spends more on compiling than it saves.
COMPILE_MIN_STEPS = 500


@dataclass(frozen=True)
class Kernels:
    """The switches as decided for one job on one worker."""

    fused_optimizer: bool
    compile: bool
    liger: bool

    def as_dict(self) -> dict:
        return asdict(self)


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def fused_optimizer(opt, device) -> bool:
    """``optimizer.fused`` on ``device``: ``auto`` is the fused step on GPUs only."""
    return str(device).startswith("cuda") if opt.fused == "auto" else bool(opt.fused)


def decide(t, steps: int, device: str, deepspeed: bool) -> Kernels:
    """The switches for a job of ``steps`` optimizer steps, training ``t`` (a TrainingSpec) on
    ``device`` ("cpu", "cuda", "cuda:N"), under DeepSpeed or the plain engine.

    Raises:
        RuntimeError: ``fused_kernels: true`` and liger-kernel is not installed here.
    """
    gpu = str(device).startswith("cuda")
    fused = fused_optimizer(t.optimizer, device)
    if t.compile == "auto":
        compiled = gpu and not deepspeed and steps >= COMPILE_MIN_STEPS
    else:
        compiled = bool(t.compile)
    if t.fused_kernels and not liger_installed():
        raise RuntimeError("training fused_kernels: true, but the liger-kernel package is not installed on this "
                           "worker (pip install liger-kernel), or set fused_kernels: false")
    liger = bool(t.fused_kernels)
    return Kernels(fused_optimizer=fused, compile=compiled, liger=liger)


def base_model(model):
    """The transformers model under a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model):
    """The model's stack of decoder layers: the ModuleList as long as its config's layer count."""
    import torch

    base = base_model(model)
    layers = getattr(base.config, "num_hidden_layers", None)
    for module in base.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return module
    return None


def compile_layers(model) -> int:
    """Compile every decoder layer in place; the whole model where no layer stack is found.
    Returns how many modules were compiled."""
    layers = decoder_layers(model)
    if layers is None:
        model.compile()
        return 1
    for layer in layers:
        layer.compile()
    return len(layers)


def apply_liger(model) -> None:
    """Liger's kernels on ``model``, in place.

    Raises:
        RuntimeError: Liger has no kernels for the model's architecture.
    """
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    base = base_model(model)
    patch = MODEL_TYPE_TO_APPLY_LIGER_FN.get(base.config.model_type)
    if patch is None:
        raise RuntimeError(f"training fused_kernels: true, but Liger has no kernels for model type "
                           f"{base.config.model_type!r}; set fused_kernels: false")
    patch(model=base)
