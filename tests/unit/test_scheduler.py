"""The scheduler: cron instants across DST, overlap, data changes, restarts — on a controllable
clock with a recording launcher; and once as the real `branchout scheduler` process."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from branchout.orchestrator.operate.registry import Registry
from branchout.orchestrator.operate.scheduler import ScheduleError, Scheduler, ScheduleStore


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


@pytest.fixture
def registry(tmp_path):
    return Registry(f"sqlite:///{tmp_path / 'registry.db'}")


def make(registry, clock, active=None, fingerprints=None):
    fired: list[tuple[float, str]] = []

    def launcher(s, reason):
        fired.append((clock(), reason))
        return f"run-{len(fired)}"

    scheduler = Scheduler(registry, launcher, clock=clock, log=lambda m: None, grace_s=1800,
                          fingerprints=fingerprints or (lambda s: {}),
                          active_run=active or (lambda s: None))
    return scheduler, fired


def run_until(scheduler, clock, end: float, step: float = 1800) -> None:
    while clock.t < end:
        clock.t += step
        scheduler.tick()



def test_cron_across_daylight_saving_time(registry, tmp_path):
    clock = Clock(utc(2026, 3, 27, 12))
    scheduler, fired = make(registry, clock)
    scheduler.store.add(str(tmp_path / "p.yaml"), "0 3 * * *", "Europe/Berlin", now=clock.t)
    run_until(scheduler, clock, utc(2026, 3, 31, 12))
    # 03:00 in Berlin is 02:00 UTC before the switch (CET) and 01:00 UTC after it (CEST, 29 March)
    expected = [utc(2026, 3, 28, 2), utc(2026, 3, 29, 1), utc(2026, 3, 30, 1), utc(2026, 3, 31, 1)]
    assert len(fired) == 4
    for (when, reason), instant in zip(fired, expected, strict=True):
        assert instant <= when < instant + 1800, (datetime.fromtimestamp(when, timezone.utc), reason)
    assert "cron '0 3 * * *' at 2026-03-29T03:00:00+02:00" in fired[1][1]


def test_overlap_skip_and_queue(registry, tmp_path):
    clock = Clock(utc(2026, 1, 5, 0))
    busy = {"run": "run-busy"}
    scheduler, fired = make(registry, clock, active=lambda s: busy["run"])
    skip = scheduler.store.add(str(tmp_path / "a.yaml"), "0 * * * *", now=clock.t)
    queue = scheduler.store.add(str(tmp_path / "b.yaml"), "0 * * * *", overlap="queue", now=clock.t)
    run_until(scheduler, clock, utc(2026, 1, 5, 2, 30))  # two fire times while busy
    assert fired == []
    events = Registry(registry.url).events_for()
    assert [e["kind"] for e in events if e["subject"] == f"schedule:{skip}"].count("skipped") == 2
    assert any("run run-busy is still running (overlap: skip)" in e["reason"] for e in events)
    assert [e["kind"] for e in events if e["subject"] == f"schedule:{queue}"] == ["queued"]  # one pending fire
    busy["run"] = None
    scheduler.tick()
    assert len(fired) == 1 and fired[0][1] == "queued fire"  # only the queued schedule fires at once
    assert not scheduler.store.get(queue).queued


def test_data_change_fires_exactly_once(registry, tmp_path):
    clock = Clock(utc(2026, 1, 5))
    data = {"pretrain": "p0", "legal": "l0"}
    scheduler, fired = make(registry, clock, fingerprints=lambda s: dict(data))
    scheduler.store.add(str(tmp_path / "p.yaml"), None, on_data_change=True, poll_s=60, now=clock.t)
    run_until(scheduler, clock, clock.t + 600, step=60)
    assert fired == []  # the first look only records
    data["legal"] = "l1"
    run_until(scheduler, clock, clock.t + 600, step=60)
    assert [r for _, r in fired] == ["data changed: legal"]


def test_watch_fires_only_for_the_watched_dataset(registry, tmp_path):
    clock = Clock(utc(2026, 1, 5))
    data = {"pretrain": "p0", "legal": "l0", "code": "c0"}
    scheduler, fired = make(registry, clock, fingerprints=lambda s: dict(data))
    sid = scheduler.store.add(str(tmp_path / "p.yaml"), "0 3 * * 1", watch=["legal"], poll_s=60, now=clock.t)
    assert scheduler.store.get(sid).on_data_change  # --watch implies it
    run_until(scheduler, clock, clock.t + 300, step=60)
    data["code"], data["pretrain"] = "c1", "p1"
    run_until(scheduler, clock, clock.t + 300, step=60)
    assert fired == []  # not watched
    data["legal"] = "l1"
    run_until(scheduler, clock, clock.t + 300, step=60)
    assert [r for _, r in fired] == ["data changed: legal"]


@pytest.mark.parametrize("policy,expected", [("run-once", 1), ("skip", 0)])
def test_restart_keeps_schedules_and_applies_missed_policy(registry, tmp_path, policy, expected):
    clock = Clock(utc(2026, 1, 5, 0, 30))
    first, fired = make(registry, clock)
    schedule_id = first.store.add(str(tmp_path / "p.yaml"), "0 * * * *", missed=policy, now=clock.t)
    run_until(first, clock, utc(2026, 1, 5, 0, 50), step=600)  # waiting for 01:00 when it goes down
    del first
    clock.t = utc(2026, 1, 5, 4, 45)  # down for 01:00, 02:00, 03:00 and 04:00 (older than the grace)
    second, fired_again = make(registry, clock)
    assert [s.id for s in second.store.all()] == [schedule_id]  # nothing was only in memory
    second.tick()
    assert len(fired_again) == expected
    missed = [e for e in Registry(registry.url).events_for() if e["kind"] == "missed"]
    assert len(missed) == 1 and missed[0]["reason"].startswith("4 fire time(s) passed while no scheduler ran")
    assert second.store.get(schedule_id).next_fire == utc(2026, 1, 5, 5)


def test_bad_schedules(registry, tmp_path):
    store = ScheduleStore(registry)
    with pytest.raises(ScheduleError, match="give --cron, --on-data-change, or both"):
        store.add(str(tmp_path / "p.yaml"), None)
    with pytest.raises(ScheduleError, match="not a valid cron expression"):
        store.add(str(tmp_path / "p.yaml"), "every monday")
    with pytest.raises(ScheduleError, match="unknown time zone"):
        store.add(str(tmp_path / "p.yaml"), "0 3 * * 1", "Mars/Olympus")


@pytest.mark.parametrize("trigger", ["cron", "data", "queued"])
def test_two_schedulers_on_one_registry_fire_a_due_time_once(registry, tmp_path, trigger):
    """Both read the schedule before either writes (the race of two processes): the database's
    compare-and-set gives the fire to one of them (issue 32: both used to fire)."""
    clock = Clock(utc(2026, 3, 27, 12))
    launched: list[str] = []

    def launcher(s, reason):
        launched.append(reason)
        return f"run-{len(launched)}"

    data = {"version": 1}
    pair = [Scheduler(registry, launcher, clock=clock, log=lambda m: None, grace_s=1800,
                      fingerprints=lambda s: {"legal": str(data["version"])}, active_run=lambda s: None)
            for _ in range(2)]
    store = pair[0].store
    if trigger == "cron":
        store.add(str(tmp_path / "p.yaml"), "0 3 * * *", "UTC", now=clock.t)
        clock.t = utc(2026, 3, 28, 3, 5)
    elif trigger == "data":
        store.add(str(tmp_path / "p.yaml"), None, "UTC", on_data_change=True, now=clock.t)
        pair[0].tick()  # records the fingerprints
        data["version"], clock.t = 2, clock.t + 3600
    else:
        store.add(str(tmp_path / "p.yaml"), "0 3 * * *", "UTC", now=clock.t)
        store.update(store.all()[0].id, queued=True)
    (seen,) = store.all()  # what both read
    for scheduler in pair:
        scheduler._tick_one(seen)
    assert len(launched) == 1, launched
