"""What makes a restart resume where it should, without Ray: the order of checkpoint and log,
attempt leases against orphaned workers, resume points kept for the driver, injected faults."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from branchout.core.spec import FinetuneOptions


class _Engine:
    def train_step(self, micro):
        return 1.0

    def lr(self):
        return 0.1


class _Logger:
    def __init__(self, events):
        self.events = events

    def log(self, step, **metrics):
        self.events.append(("log", step))


def test_a_checkpoint_is_durable_before_its_step_is_logged():
    from branchout.stages.training.loop import run_steps

    events: list[tuple[str, int]] = []
    t = FinetuneOptions(steps=6, global_batch_size=2, micro_batch_size=2, checkpoint_every=2, log_every=1)
    run_steps(_Engine(), np.zeros((8, 4), dtype=np.uint16), t, 6, 0, 0, 1, _Logger(events),
              lambda step, loss: events.append(("checkpoint", step)), lambda step: events.append(("after", step)))
    for step in (2, 4):
        assert events.index(("checkpoint", step)) < events.index(("log", step)) < events.index(("after", step))


def test_an_injected_fault_kills_once_at_its_step(tmp_path, monkeypatch):
    from branchout.stages.training.faults import killer

    code = ("import sys; from branchout.stages.training.faults import killer; k = killer('finetune/x', sys.argv[1], 0); "
            "[k(s) for s in range(1, 10)]")
    monkeypatch.setenv("BRANCHOUT_FAULTS", "pretrain@3, finetune/x@5")
    first = subprocess.run([sys.executable, "-c", code, str(tmp_path)])
    assert first.returncode == -9 and (tmp_path / "FAULT-5").exists()
    again = subprocess.run([sys.executable, "-c", code, str(tmp_path)])
    assert again.returncode == 0  # fired once: the restarted attempt runs on
    assert killer("finetune/x", str(tmp_path), rank=1) is None  # rank 0 only
    assert killer("finetune/y", str(tmp_path), rank=0) is None  # jobs not named run untouched


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # runs code when unpickled with weights_only=False


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import pickle

    import torch

    from branchout.stages.training.ds_files import safe_load

    marker = tmp_path / "code-ran"
    torch.save({"model": {"w": torch.zeros(2)}, "client_state": {"step": 3, "x": _Payload(str(marker))}},
               tmp_path / "state.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        safe_load(str(tmp_path / "state.pt"))
    assert not marker.exists()
    torch.save({"model": {"w": torch.zeros(2)}, "client_state": {"step": 3}}, tmp_path / "plain.pt")
    assert safe_load(str(tmp_path / "plain.pt"))["client_state"]["step"] == 3
