"""Run, stage and job states, their legal transitions, and the run record.

This module is the only place states change: ``RunRecord.set_run_state`` and
``RunRecord.set_stage`` check every move against the tables below and persist the
record to ``<run dir>/state.json`` after each change, so a reader (``status``, a
resumed driver, the report) always sees a state the driver actually passed through.

Run states::

    PENDING ──► RUNNING ──► SUCCEEDED
       │           ├──────► FAILED ──┐
       └───────────┴──────► STOPPED ─┴─► RUNNING (resume)

Stage and job states (a *stage* is tokenizer/data/pretrain/finetune/evaluate; a *job*
is one domain's fine-tune, baseline or evaluation, keyed ``<kind>/<domain>``)::

    PENDING ──► QUEUED ──► RUNNING ──► SUCCEEDED ─► QUEUED (its inputs were redone)
       ├─────────────────────────────► CACHED (same inputs already computed and verified)
       │          │          └───────► FAILED ──► QUEUED (retry, resume)
       └──────────┴──────────────────► SKIPPED ─► QUEUED (resume)

Every attempt (each entry into RUNNING) is kept in ``StageRecord.history`` with how it
ended, so ``status`` can show why a job needed a retry.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from branchout.stages import storage


class RunState(str, Enum):
    PENDING = "pending"  # created; no stage has started
    RUNNING = "running"  # a driver is working through the stages
    SUCCEEDED = "succeeded"  # every stage and every domain job succeeded
    FAILED = "failed"  # a stage or a domain job failed; `error` says which
    STOPPED = "stopped"  # stopped by a user or the driver was interrupted

    def is_terminal(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED)


class StageState(str, Enum):
    PENDING = "pending"  # not reached yet
    QUEUED = "queued"  # submitted; waiting for the cluster to free resources
    RUNNING = "running"  # a worker reported that it started
    SUCCEEDED = "succeeded"  # outputs published and verified
    FAILED = "failed"  # gave up after its retries; `error` holds the cause
    SKIPPED = "skipped"  # not run because something it needs failed
    CACHED = "cached"  # not run: a verified output for the same inputs exists (orchestrator.cache)

    def is_terminal(self) -> bool:
        return self in (StageState.SUCCEEDED, StageState.FAILED, StageState.SKIPPED, StageState.CACHED)

    @property
    def done(self) -> bool:
        """Its outputs exist: computed in this run or reused from the cache."""
        return self in (StageState.SUCCEEDED, StageState.CACHED)


RUN_TRANSITIONS: dict[RunState, set[RunState]] = {
    RunState.PENDING: {RunState.RUNNING, RunState.FAILED, RunState.STOPPED},
    RunState.RUNNING: {RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED},
    RunState.FAILED: {RunState.RUNNING},
    RunState.STOPPED: {RunState.RUNNING},
    RunState.SUCCEEDED: set(),
}

STAGE_TRANSITIONS: dict[StageState, set[StageState]] = {
    StageState.PENDING: {StageState.QUEUED, StageState.RUNNING, StageState.SKIPPED, StageState.FAILED,
                         StageState.CACHED},
    StageState.QUEUED: {StageState.RUNNING, StageState.FAILED, StageState.SKIPPED},
    StageState.RUNNING: {StageState.SUCCEEDED, StageState.FAILED},
    StageState.FAILED: {StageState.QUEUED, StageState.RUNNING, StageState.CACHED},
    StageState.CACHED: {StageState.QUEUED},  # like SUCCEEDED: redone only when what it scored changed
    # A succeeded evaluation is redone when a resume recomputed what it scored.
    StageState.SUCCEEDED: {StageState.QUEUED},
    StageState.SKIPPED: {StageState.QUEUED, StageState.CACHED},  # a resumed run picks skipped jobs up again
}


def new_run_id() -> str:
    """Sortable by time, unique across concurrent submitters: ``20261125-031500-a1b2c3``."""
    import secrets

    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class IllegalTransitionError(RuntimeError):
    """An internal bug: the driver tried a move the tables above do not allow."""


@dataclass
class StageRecord:
    name: str
    state: StageState = StageState.PENDING
    attempts: int = 0
    queued: float | None = None  # when it was last submitted
    started: float | None = None
    ended: float | None = None
    error: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per attempt

    @property
    def seconds(self) -> float | None:
        return (self.ended - self.started) if self.started and self.ended else None


@dataclass
class RunRecord:
    run_id: str
    pipeline: str
    run_uri: str
    spec_hash: str
    state: RunState = RunState.PENDING
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    error: str | None = None
    stages: dict[str, StageRecord] = field(default_factory=dict)
    tracking: dict[str, Any] = field(default_factory=dict)  # MLflow run ids (orchestrator.tracking)

    # ---- transitions -------------------------------------------------------------

    def set_run_state(self, new: RunState, error: str | None = None) -> None:
        if new not in RUN_TRANSITIONS[self.state]:
            raise IllegalTransitionError(f"run {self.run_id}: {self.state.value} → {new.value}")
        self.state = new
        if new is RunState.RUNNING:
            self.started = self.started or time.time()
            self.ended, self.error = None, None
        if new.is_terminal():
            self.ended = time.time()
            self.error = error
        self.save()

    def set_stage(self, name: str, new: StageState, *, error: str | None = None,
                  when: float | None = None, outputs: dict[str, Any] | None = None,
                  metrics: dict[str, Any] | None = None) -> StageRecord:
        rec = self.stages.setdefault(name, StageRecord(name))
        if new is not rec.state:
            if new not in STAGE_TRANSITIONS[rec.state]:
                raise IllegalTransitionError(f"{name}: {rec.state.value} → {new.value}")
            rec.state = new
            now = when or time.time()
            if new is StageState.RUNNING:
                rec.attempts += 1
                rec.started = rec.started or now
                rec.history.append({"attempt": rec.attempts, "state": new.value, "started": now,
                                    "ended": None, "error": None})
            elif rec.history and rec.history[-1]["ended"] is None and new is not StageState.QUEUED:
                rec.history[-1].update(state=new.value, ended=now, error=error)
            if new.is_terminal():
                rec.ended = now
            if new is StageState.QUEUED:
                rec.ended = None
                rec.queued = now
        if error is not None:
            rec.error = error
        rec.outputs.update(outputs or {})
        rec.metrics.update(metrics or {})
        self.save()
        return rec

    def stage(self, name: str) -> StageRecord:
        """The record of ``name``; a detached PENDING one when the run has no such job."""
        return self.stages.get(name) or StageRecord(name)

    def jobs(self, kind: str) -> dict[str, StageRecord]:
        """Domain jobs of one kind (``finetune``, ``scratch``, ``evaluate``) by domain."""
        prefix = f"{kind}/"
        return {k[len(prefix):]: v for k, v in self.stages.items() if k.startswith(prefix)}

    # ---- persistence -------------------------------------------------------------

    @property
    def state_uri(self) -> str:
        return storage.join(self.run_uri, "state.json")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=lambda v: v.value if isinstance(v, Enum) else str(v))

    def attach(self, registry, **extra: Any) -> None:
        """Also write every change to ``registry`` (with ``extra`` run columns)."""
        self._registry = registry
        self._registry_extra = extra

    def save(self) -> None:
        storage.write_text(self.state_uri, self.to_json(), durable=False)
        registry = getattr(self, "_registry", None)
        if registry is not None:
            registry.sync(self, **self._registry_extra)

    def interrupted(self, reason: str, run_state: RunState = RunState.FAILED,
                    run_error: str | None = None) -> None:
        """A driver ended (or died) mid-run: what it left RUNNING or QUEUED did not finish."""
        for name, rec in self.stages.items():
            if rec.state in (StageState.QUEUED, StageState.RUNNING):
                self.set_stage(name, StageState.FAILED, error=reason)
        if self.state is RunState.RUNNING:
            self.set_run_state(run_state, error=run_error or reason)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        raw = json.loads(text)
        stages = {k: StageRecord(**{**v, "state": StageState(v["state"])}) for k, v in raw.pop("stages").items()}
        return cls(**{**raw, "state": RunState(raw["state"]), "stages": stages})

    @classmethod
    def load(cls, run_uri: str) -> RunRecord:
        return cls.from_json(storage.read_text(storage.join(run_uri, "state.json")))
