"""A run whose driver died while the run was still ``pending`` (fingerprinting its data,
connecting to MLflow, a Ctrl-C) is reconciled like a running one: ``failed: driver lost``,
so ``resume`` takes it and an ``overlap: skip`` schedule fires again (issue 32)."""

from __future__ import annotations

import socket
import subprocess
import sys

from branchout.orchestrator.operate.control import refresh
from branchout.orchestrator.operate.registry import Registry
from branchout.orchestrator.run.state import RunRecord, RunState


def test_a_pending_run_whose_driver_is_gone_becomes_failed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    record = RunRecord(run_id="20261204-000000-abcdef", pipeline="tiny", spec_hash="x",
                       run_uri=str(tmp_path / "runs" / "tiny" / "20261204-000000-abcdef"))
    record.save()
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.sync(record, driver_host=socket.gethostname(), driver_pid=gone.pid)
    assert registry.get_run(record.run_id).state == RunState.PENDING.value

    view = refresh(registry, registry.get_run(record.run_id))
    assert view.record.state is RunState.FAILED
    assert view.record.error == "interrupted: driver lost (driver process exited)"
    assert registry.get_run(record.run_id).state == RunState.FAILED.value
    assert RunRecord.load(record.run_uri).state is RunState.FAILED  # state.json too: resume reads it


def test_a_stopped_pending_run_is_stopped():
    record = RunRecord(run_id="r", pipeline="tiny", spec_hash="x", run_uri="/unused")
    record.interrupted("stopped before it finished", RunState.STOPPED, "stopped by request")
    assert (record.state, record.error) == (RunState.STOPPED, "stopped by request")
