"""What makes a restart resume where it should, without Ray: the order of checkpoint and log,
attempt leases against orphaned workers, resume points kept for the driver, injected faults."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

from branchout.orchestrator.spec import FinetuneOptions
from branchout.stages import storage
from branchout.stages.job import LeaseLostError

from conftest import job_for, job_parts

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def parts(corpus_dir, tmp_path_factory):
    return job_parts(tmp_path_factory.mktemp("recovery"), corpus_dir)


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


@pytest.mark.unit
def test_a_checkpoint_is_durable_before_its_step_is_logged():
    from branchout.stages.loop import run_steps

    events: list[tuple[str, int]] = []
    t = FinetuneOptions(steps=6, global_batch_size=2, micro_batch_size=2, checkpoint_every=2, log_every=1)
    run_steps(_Engine(), np.zeros((8, 4), dtype=np.uint16), t, 6, 0, 0, 1, _Logger(events),
              lambda step, loss: events.append(("checkpoint", step)), lambda step: events.append(("after", step)))
    for step in (2, 4):
        assert events.index(("checkpoint", step)) < events.index(("log", step)) < events.index(("after", step))


def test_a_superseded_attempt_writes_nothing(parts):
    from branchout.stages.finetune import run_single_worker

    orphan = job_for(parts, "superseded", "full", steps=8, checkpoint_every=2)
    orphan.claim()
    newer = copy.deepcopy(orphan)
    newer.claim()  # a resumed driver's attempt takes the job over
    with pytest.raises(LeaseLostError, match="a newer attempt owns"):
        orphan.check_lease()
    newer.check_lease()
    with pytest.raises(LeaseLostError):
        run_single_worker(orphan)
    assert storage.listdir(orphan.checkpoints_uri) == [] and not storage.exists(orphan.model_uri)


def test_a_finished_orphan_leaves_the_resumed_attempt_its_checkpoints(parts):
    """A worker that outlives its driver may finish the job; the driver never recorded that,
    so a resumed attempt runs the job again and must resume from the newest checkpoint."""
    from branchout.stages.finetune import run_single_worker

    job = job_for(parts, "orphan", "full", steps=8, checkpoint_every=3)
    job.claim()
    assert run_single_worker(job)["first_step"] == 0
    assert storage.listdir(job.checkpoints_uri) == ["step_00000003", "step_00000006"]
    job.claim()
    assert run_single_worker(job)["first_step"] == 6


@pytest.mark.unit
def test_an_injected_fault_kills_once_at_its_step(tmp_path, monkeypatch):
    from branchout.stages.faults import killer

    code = ("import sys; from branchout.stages.faults import killer; k = killer('finetune/x', sys.argv[1], 0); "
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


@pytest.mark.unit
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import pickle

    import torch

    from branchout.stages.engine import safe_load

    marker = tmp_path / "code-ran"
    torch.save({"model": {"w": torch.zeros(2)}, "client_state": {"step": 3, "x": _Payload(str(marker))}},
               tmp_path / "state.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        safe_load(str(tmp_path / "state.pt"))
    assert not marker.exists()
    torch.save({"model": {"w": torch.zeros(2)}, "client_state": {"step": 3}}, tmp_path / "plain.pt")
    assert safe_load(str(tmp_path / "plain.pt"))["client_state"]["step"] == 3
