"""Storage writes retried on transient errors (``storage.retry``), never on permanent ones, and
a training job that finishes with verified checkpoints while 2 of every 5 writes fail."""

from __future__ import annotations

import json

import pytest

from branchout import storage
from branchout.storage import retry


@pytest.fixture
def faults(monkeypatch):
    monkeypatch.setattr(retry, "BASE_DELAY_S", 0.001)
    monkeypatch.setenv(retry.FAULTS_ENV, "2/5")
    retry.reset_faults()
    yield
    retry.reset_faults()


def test_writes_are_retried_through_transient_errors(faults, tmp_path, capfd):
    for i in range(6):
        storage.write_text(str(tmp_path / f"f{i}.json"), json.dumps(i))
    assert [json.loads((tmp_path / f"f{i}.json").read_text()) for i in range(6)] == list(range(6))
    retries = [ln for ln in capfd.readouterr().err.splitlines() if "retry" in ln]
    assert len(retries) == 4 and "injected by BRANCHOUT_STORAGE_FAULTS=2/5" in retries[0]


def test_a_permanent_error_is_raised_at_once(monkeypatch):
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("denied")

    with pytest.raises(PermissionError):
        retry.retrying("write x", denied)
    assert calls == [1]
    assert retry.transient(OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate. "
                                   "HTTP status 503"))
    assert not retry.transient(OSError("No space left on device"))


def test_too_many_failures_give_up(monkeypatch):
    monkeypatch.setattr(retry, "BASE_DELAY_S", 0.001)
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionResetError("connection reset by peer")

    with pytest.raises(ConnectionResetError):
        retry.retrying("write x", flaky)
    assert len(calls) == retry.ATTEMPTS


def test_a_job_finishes_with_verified_checkpoints_while_writes_fail(faults, corpus_dir, tmp_path):
    from branchout.storage.checkpoint import fetch_verified, newest_good

    from conftest import job_for, job_parts

    parts = job_parts(tmp_path, corpus_dir)
    job = job_for(parts, "flaky", "full", steps=6, checkpoint_every=2, keep_checkpoints=2)
    from branchout.stages.training.recipe import train

    result = train(job)
    assert result["steps"] == 6 and retry._attempts > 10  # it wrote through the faults
    names = sorted(p.name for p in (tmp_path / "flaky" / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000004"]
    assert newest_good(str(tmp_path / "flaky" / "checkpoints"), names, world=1)[0] == "step_00000004"
    fetch_verified(str(tmp_path / "flaky" / "model"))  # the export verifies
