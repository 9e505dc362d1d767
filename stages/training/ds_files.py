"""Checkpoint files and DeepSpeed itself, read safely and loaded cheaply: the plain engine's
``state.pt`` (``write_state`` / ``read_state``), ``weights_only`` loading of anything from shared
storage (``safe_load``, ``weights_only_loads``), DeepSpeed's import without its autotuner's
MLflow (``import_deepspeed``), and no import of it at all where nothing uses it
(``without_deepspeed``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


def import_deepspeed():
    """``import deepspeed``, without the MLflow import its autotuner makes.

    DeepSpeed's package import reaches ``deepspeed.autotuning.autotuner``, which imports MLflow
    when it is installed (it is: branchout's tracking uses it): 1.1 s of a 2.4 s import here,
    in every training process, for an autotuner branchout never runs. The autotuner goes
    without it (its ``has_mlflow`` is False); MLflow stays importable afterwards, and a process
    that imported it already keeps it.
    """
    import sys

    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    with _hidden("mlflow"):  # `import mlflow` raises ImportError while DeepSpeed loads
        import deepspeed
    return deepspeed


def without_deepspeed() -> contextlib.AbstractContextManager[None]:
    """Inside, DeepSpeed looks uninstalled to a process that has not imported it.

    ``save_pretrained`` unwraps the model through accelerate, which imports DeepSpeed
    whenever it is installed, to test the model against ``DeepSpeedEngine``; DeepSpeed's
    import in turn loads its autotuner's MLflow. A process that never trained with DeepSpeed
    (a warm runner's fine-tune, its export) holds no such engine, and paid ~3.5 s of imports
    (2-core Zen 1) on its first export for that test. A process that imported DeepSpeed keeps
    it, and the test runs as before.
    """
    return _hidden("deepspeed")


@contextlib.contextmanager
def _hidden(package: str) -> Iterator[None]:
    """Inside, ``package`` is not importable (``importlib.util.find_spec`` says None, ``import``
    raises ImportError) unless this process already imported it, which then keeps it."""
    import sys

    if package in sys.modules:
        yield
        return
    sys.modules[package] = None
    try:
        yield
    finally:
        if sys.modules.get(package, 0) is None:
            del sys.modules[package]


def write_state(path: str, model_state: dict, optimizer, scheduler, client_state: dict[str, Any],
                scaler_state: dict | None = None) -> None:
    """A plain-torch job's checkpoint, ``<path>/state.pt``: its trainable weights, optimizer,
    schedule, loss scaler and client state. One format for a lone job and an adapter farm's
    member (``stages.training.farm_runner``), so either resumes the other's."""
    import torch

    os.makedirs(path, exist_ok=True)
    torch.save({"model": model_state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler_state or {}, "client_state": client_state}, os.path.join(path, "state.pt"))


def read_state(path: str, optimizer, scheduler, device) -> dict[str, Any]:
    """``write_state``'s checkpoint: loads the optimizer and schedule, returns the whole state
    (``model``: the trainable weights, for the caller to put in place)."""
    state = safe_load(os.path.join(path, "state.pt"), map_location=device)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


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


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside is ``weights_only`` (``safe_load``), whatever its caller asked.

    DeepSpeed's converter and its universal loader unpickle with ``weights_only=False``;
    the files come from shared storage, where whoever can write could plant objects whose
    unpickling runs code. Their contents are tensors, numbers and a few DeepSpeed types.
    """
    import torch

    original = torch.load

    def load(f, map_location=None, *args, **kwargs):
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return original(f, map_location=map_location, weights_only=True)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _deepspeed_globals() -> list:
    try:
        import_deepspeed()
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # a plain-torch checkpoint needs none of them
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
