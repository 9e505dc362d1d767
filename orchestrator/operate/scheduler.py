"""Scheduled retraining: cron times and data changes fire pipeline runs.

Schedules live in the registry (table ``schedules``), never only in memory: a restarted
scheduler finds them, with the last fire time and the last data fingerprints. Each tick:

1. **cron** (croniter, in the schedule's time zone): a fire time that has come is *on time*
   if it is less than ``grace_s`` old; older ones were missed while no scheduler ran, and
   the schedule's ``missed`` policy decides: ``run-once`` (one run for all of them) or
   ``skip``. Either way the next fire time moves past now.
2. **data change**: every ``poll_s`` the pipeline's datasets are fingerprinted (cheap:
   unchanged files are not re-read) and compared with the last fingerprints; a change fires
   one run. The first look only records the fingerprints.
3. **overlap**: no two runs of one pipeline at once. ``skip`` drops a fire while a run is
   active; ``queue`` keeps one pending fire and starts it when the active run ends.

Every decision (fired, skipped, queued, missed) is written to the registry's ``events``
with its reason. The clock and the launcher are injected, so the policy is tested with a
controllable clock and without starting runs; ``branchout scheduler`` wires the real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from branchout.orchestrator.operate.registry import Registry, metadata

schedules = sa.Table(
    "schedules", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("pipeline", sa.Text, nullable=False),  # absolute path of the pipeline file
    sa.Column("overrides", sa.Text, nullable=False, default="[]"),
    sa.Column("cron", sa.String(128)),
    sa.Column("timezone", sa.String(64), nullable=False, default="UTC"),
    sa.Column("on_data_change", sa.Boolean, nullable=False, default=False),
    sa.Column("watch", sa.Text),  # JSON list of dataset names whose change fires; null = all
    sa.Column("poll_s", sa.Float, nullable=False, default=300.0),
    sa.Column("address", sa.Text),  # submit to this cluster; null = run locally
    sa.Column("overlap", sa.String(16), nullable=False, default="skip"),
    sa.Column("missed", sa.String(16), nullable=False, default="run-once"),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("next_fire", sa.Float),
    sa.Column("last_fire", sa.Float),
    sa.Column("last_run", sa.String(64)),
    sa.Column("last_poll", sa.Float),
    sa.Column("fingerprints", sa.Text),
    sa.Column("queued", sa.Boolean, nullable=False, default=False),
)

OVERLAP = ("skip", "queue")
MISSED = ("run-once", "skip")
LAUNCH_GRACE_S = 120.0  # a just-launched run counts as active until its driver registers


class ScheduleError(ValueError):
    """A schedule that cannot work (bad cron, unknown time zone, nothing to trigger it)."""


@dataclass
class Schedule:
    id: int
    pipeline: str
    overrides: list[str]
    cron: str | None
    timezone: str
    on_data_change: bool
    watch: list[str] | None
    poll_s: float
    address: str | None
    overlap: str
    missed: str
    created: float
    next_fire: float | None
    last_fire: float | None
    last_run: str | None
    last_poll: float | None
    fingerprints: dict | None
    queued: bool


def next_cron_time(cron: str, tz: str, after: float) -> float:
    """The first fire time strictly after ``after`` (epoch seconds), in time zone ``tz``."""
    from croniter import croniter

    start = datetime.fromtimestamp(after, ZoneInfo(tz))
    return float(croniter(cron, start).get_next(float))


def validate(cron: str | None, tz: str, on_data_change: bool, overlap: str, missed: str) -> None:
    from croniter import croniter

    if not cron and not on_data_change:
        raise ScheduleError("give --cron, --on-data-change, or both")
    if cron and not croniter.is_valid(cron):
        raise ScheduleError(f"--cron {cron!r}: not a valid cron expression")
    try:
        ZoneInfo(tz)
    except (KeyError, ValueError):
        raise ScheduleError(f"--timezone {tz!r}: unknown time zone") from None
    if overlap not in OVERLAP:
        raise ScheduleError(f"--overlap {overlap!r}: expected {' or '.join(OVERLAP)}")
    if missed not in MISSED:
        raise ScheduleError(f"--missed {missed!r}: expected {' or '.join(MISSED)}")


class ScheduleStore:
    def __init__(self, registry: Registry):
        self.registry = registry  # its migrations made the table (revision 0002)

    def add(self, pipeline: str, cron: str | None, tz: str = "UTC", on_data_change: bool = False,
            poll_s: float = 300.0, address: str | None = None, overlap: str = "skip",
            missed: str = "run-once", overrides: list[str] | None = None, now: float | None = None,
            watch: list[str] | None = None) -> int:
        """``watch`` narrows the data-change trigger to these datasets (``pretrain`` or domain
        names); it implies ``on_data_change``."""
        on_data_change = on_data_change or bool(watch)
        validate(cron, tz, on_data_change, overlap, missed)
        now = time.time() if now is None else now
        with self.registry.engine.begin() as conn:
            result = conn.execute(schedules.insert().values(
                pipeline=os.path.abspath(pipeline), overrides=json.dumps(overrides or []), cron=cron,
                timezone=tz, on_data_change=on_data_change, watch=json.dumps(watch) if watch else None, poll_s=poll_s, address=address, overlap=overlap,
                missed=missed, created=now, next_fire=next_cron_time(cron, tz, now) if cron else None,
                queued=False))
            return int(result.inserted_primary_key[0])

    def all(self) -> list[Schedule]:
        with self.registry.engine.connect() as conn:
            rows = conn.execute(sa.select(schedules).order_by(schedules.c.id)).mappings().all()
        return [Schedule(**{**r, "overrides": json.loads(r["overrides"] or "[]"),
                            "watch": json.loads(r["watch"]) if r["watch"] else None,
                            "fingerprints": json.loads(r["fingerprints"]) if r["fingerprints"] else None})
                for r in rows]

    def get(self, schedule_id: int) -> Schedule:
        found = [s for s in self.all() if s.id == schedule_id]
        if not found:
            raise ScheduleError(f"no schedule {schedule_id} (see `branchout schedule list`)")
        return found[0]

    def update(self, schedule_id: int, **values) -> None:
        if "fingerprints" in values and values["fingerprints"] is not None:
            values["fingerprints"] = json.dumps(values["fingerprints"])
        with self.registry.engine.begin() as conn:
            conn.execute(schedules.update().where(schedules.c.id == schedule_id).values(**values))

    def claim(self, schedule_id: int, column: str, seen, **values) -> bool:
        """Set ``values`` only if ``column`` still holds ``seen``, what this scheduler read: one
        compare-and-set in the database. Two schedulers on one registry read the same due time;
        only the one whose update lands claims it, the other stands down."""
        c = schedules.c[column]
        with self.registry.engine.begin() as conn:
            done = conn.execute(schedules.update().where(schedules.c.id == schedule_id)
                                .where(c.is_(None) if seen is None else c == seen).values(**values))
        return done.rowcount == 1

    def remove(self, schedule_id: int) -> None:
        self.get(schedule_id)
        with self.registry.engine.begin() as conn:
            conn.execute(schedules.delete().where(schedules.c.id == schedule_id))


Launcher = Callable[[Schedule, str], str]  # (schedule, reason) → run id


class Scheduler:
    """One ``tick()`` applies every schedule's policy at ``clock()``; ``serve()`` repeats it."""

    def __init__(self, registry: Registry, launcher: Launcher, clock: Callable[[], float] = time.time,
                 log: Callable[[str], None] = print, grace_s: float = 120.0,
                 fingerprints: Callable[[Schedule], dict[str, str]] | None = None,
                 active_run: Callable[[Schedule], str | None] | None = None):
        self.registry = registry
        self.store = ScheduleStore(registry)
        self.launcher = launcher
        self.clock = clock
        self.log = log
        self.grace_s = grace_s
        self.fingerprints = fingerprints or pipeline_fingerprints
        self.active_run = active_run or (lambda s: active_run_of(registry, s, clock()))

    def decide(self, s: Schedule, kind: str, reason: str, **data) -> None:
        self.registry.log_event(kind, f"schedule:{s.id}", reason, **data)
        self.log(f"schedule {s.id} ({os.path.basename(s.pipeline)}): {kind}: {reason}")

    def tick(self) -> None:
        for s in self.store.all():
            try:
                self._tick_one(s)
            except Exception as e:  # one broken schedule must not stop the others
                self.decide(s, "error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")

    def _tick_one(self, s: Schedule) -> None:
        now = self.clock()
        reasons = []
        if s.cron and s.next_fire is not None and s.next_fire <= now:
            if not self.store.claim(s.id, "next_fire", s.next_fire,
                                    next_fire=next_cron_time(s.cron, s.timezone, now)):
                return  # another scheduler on this registry took this fire time
            due = [s.next_fire]
            while (nxt := next_cron_time(s.cron, s.timezone, due[-1])) <= now:
                due.append(nxt)
            late = [t for t in due if now - t > self.grace_s]
            on_time = len(late) < len(due)  # a due time within the grace period: fire for it
            if late:
                when = ", ".join(datetime.fromtimestamp(t, ZoneInfo(s.timezone)).isoformat() for t in late[:3])
                action = ("covered by the fire due now" if on_time else
                          "running once" if s.missed == "run-once" else "skipped (policy skip)")
                self.decide(s, "missed", f"{len(late)} fire time(s) passed while no scheduler ran ({when}); {action}")
            if on_time or s.missed == "run-once":
                reasons.append(f"cron {s.cron!r} at {datetime.fromtimestamp(due[-1], ZoneInfo(s.timezone)).isoformat()}")
        if s.on_data_change and (s.last_poll is None or now - s.last_poll >= s.poll_s):
            if not self.store.claim(s.id, "last_poll", s.last_poll, last_poll=now):
                return  # another scheduler is polling this schedule's data
            current = self.fingerprints(s)
            if s.watch:  # only the watched datasets can fire; a vanished name is an error, not silence
                missing = sorted(w for w in s.watch if not any(watched(k, [w]) for k in current))
                if missing:
                    self.decide(s, "error", f"watched dataset(s) {', '.join(missing)} no longer in the pipeline")
                current = {k: v for k, v in current.items() if watched(k, s.watch)}
            changed = sorted(k for k in current if s.fingerprints is not None and current[k] != s.fingerprints.get(k))
            self.store.update(s.id, fingerprints=current)
            if s.fingerprints is None:
                self.decide(s, "watch", f"recorded the fingerprints of {', '.join(sorted(current))}")
            elif changed:
                reasons.append(f"data changed: {', '.join(changed)}")
        if not reasons and s.queued and not self.store.claim(s.id, "queued", True, queued=False):
            return  # another scheduler fired the queued run
        if reasons or s.queued:
            self._fire(s, "; ".join(reasons) or "queued fire", now)

    def _fire(self, s: Schedule, reason: str, now: float) -> None:
        active = self.active_run(s)
        if active:
            if s.overlap == "queue":
                if not s.queued:
                    self.decide(s, "queued", f"{reason}; waiting for run {active} to end")
                self.store.update(s.id, queued=True)
            else:
                self.decide(s, "skipped", f"{reason}; run {active} is still running (overlap: skip)")
            return
        run_id = self.launcher(s, reason)
        self.store.update(s.id, last_fire=now, last_run=run_id, queued=False)
        self.decide(s, "fired", f"{reason} → run {run_id}", run_id=run_id)

    def serve(self, interval_s: float, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            self.tick()
            deadline = time.time() + interval_s
            while time.time() < deadline and not should_stop():
                time.sleep(min(0.2, interval_s))


def watched(dataset: str, watch: list[str]) -> bool:
    """Whether ``--watch`` names the dataset: itself, or ``pretrain`` for every source of a
    pretraining mixture (``pretrain/<source>``)."""
    return dataset in watch or dataset.split("/")[0] in watch


def pipeline_fingerprints(s: Schedule) -> dict[str, str]:
    from branchout.core.graph import build_graph
    from branchout.orchestrator.config.loader import load_spec
    from branchout.orchestrator.run.cache import data_fingerprints

    return data_fingerprints(build_graph(load_spec(s.pipeline, s.overrides)))


def active_run_of(registry: Registry, s: Schedule, now: float) -> str | None:
    """A run of the schedule's pipeline that is pending or running (drivers checked alive)."""
    from branchout.orchestrator.config.loader import load_spec
    from branchout.orchestrator.operate.control import refresh

    name = load_spec(s.pipeline, s.overrides).name
    for row in registry.list_runs(pipeline=name, states=["pending", "running"]):
        if refresh(registry, row).row.state in ("pending", "running"):
            return row.run_id
    if s.last_run and s.last_fire and now - s.last_fire < LAUNCH_GRACE_S:
        try:
            registry.get_run(s.last_run)
        except LookupError:
            return s.last_run  # launched, its driver has not registered yet
    return None


def launch(s: Schedule, reason: str) -> str:
    """The real launcher: submit to the schedule's cluster, or start `branchout run` here."""
    from branchout.orchestrator.run.state import new_run_id

    if s.address:
        from branchout.orchestrator.config.loader import load_spec
        from branchout.orchestrator.operate.control import submit_pipeline

        spec = load_spec(s.pipeline, s.overrides)
        record = submit_pipeline(spec, {"path": s.pipeline, "overrides": s.overrides}, s.address, Registry())
        return record.run_id
    run_id = new_run_id()
    args = [sys.executable, "-m", "branchout", "run", s.pipeline, "--run-id", run_id]
    for o in s.overrides:
        args += ["--set", o]
    log_dir = os.path.join(os.path.expanduser("~"), ".branchout", "scheduler-logs")
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, f"{run_id}.log"), "w") as out:
        subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return run_id
