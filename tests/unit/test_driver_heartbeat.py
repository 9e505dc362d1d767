"""A driver that runs on another host (a RayJob's `branchout run` on a head pod that died) is
judged by its heartbeat: silent longer than ``lost_after_s`` means lost, and `branchout recover`
takes it; a recent heartbeat, or none at all (a driver older than heartbeats), is never
judged lost (issue 31). tests/e2e/test_head_loss.py covers a cluster that no longer knows
its job."""

from __future__ import annotations

import time

from branchout.orchestrator.operate.control import recover_lost, refresh
from branchout.orchestrator.operate.registry import Registry
from branchout.orchestrator.run.state import RunRecord, RunState


def _running(tmp_path, registry: Registry, heartbeat_age: float | None, run_id: str) -> RunRecord:
    record = RunRecord(run_id=run_id, pipeline="tiny", spec_hash="x",
                       run_uri=str(tmp_path / "runs" / "tiny" / run_id))
    record.set_run_state(RunState.RUNNING)
    record.heartbeat = None if heartbeat_age is None else time.time() - heartbeat_age
    record.save()
    registry.sync(record, driver_host="head-pod-that-died", driver_pid=12345)
    return record


def test_a_silent_driver_on_another_host_is_lost_and_recover_asks_for_a_cluster(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    silent = _running(tmp_path, registry, 900, "20261204-000000-aaaaaa")
    recent = _running(tmp_path, registry, 30, "20261204-000000-bbbbbb")
    ancient = _running(tmp_path, registry, None, "20261204-000000-cccccc")

    view = refresh(registry, registry.get_run(silent.run_id), lost_after_s=600)
    assert view.record.state is RunState.FAILED
    assert view.record.error == "interrupted: driver lost (no heartbeat for 15 min)"
    for alive in (recent, ancient):
        assert refresh(registry, registry.get_run(alive.run_id), lost_after_s=600).record.state is RunState.RUNNING

    said = []
    assert recover_lost(registry, address=None, lost_after_s=600, say=said.append) == []
    assert said == [f"run {silent.run_id}: driver lost on host head-pod-that-died; pass --address to resume it "
                    "on a cluster"]
    # a run its user stopped is not a lost one
    recent.interrupted("stopped before it finished", RunState.STOPPED, "stopped by request")
    said.clear()
    recover_lost(registry, address=None, lost_after_s=1, say=said.append)
    assert not [line for line in said if recent.run_id in line]


def test_a_running_driver_beats_at_most_every_interval(tmp_path):
    record = RunRecord(run_id="r", pipeline="tiny", spec_hash="x", run_uri=str(tmp_path / "r"))
    record.set_run_state(RunState.RUNNING)
    first = record.heartbeat
    record.beat(every_s=3600)
    assert record.heartbeat == first  # not yet due: state.json is not rewritten
    record.beat(every_s=0)
    assert record.heartbeat > first and RunRecord.load(record.run_uri).heartbeat == record.heartbeat
