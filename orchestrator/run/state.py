"""Run and job states, their legal transitions, and the run record.

A *stage* is a step of the pipeline (tokenizer, data, pretrain, finetune, evaluate); a
*job* is one unit of work the driver submits and records: a stage that runs once
(``tokenizer``, ``pretrain``) or one domain's fine-tune, baseline, data or evaluation job,
keyed ``<kind>/<domain>``. Runs and jobs each have a state machine, given below as
transition tables; the diagrams in docs/architecture.md are generated from these tables
(``python -m branchout.orchestrator.run.state`` prints them; a test keeps the docs equal).

This module is the only place states change: ``RunRecord.set_run_state`` and
``RunRecord.set_job`` check every move against the tables and persist the record to
``<run dir>/state.json`` after each change, so a reader (``status``, a resumed driver,
the report) always sees a state the driver actually passed through.

Every attempt (each entry into RUNNING) is kept in ``JobRecord.history`` with how it
ended, so ``status`` can show why a job needed a retry.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from branchout import storage


class RunState(str, Enum):
    PENDING = "pending"  # created; no stage has started
    RUNNING = "running"  # a driver is working through the stages
    SUCCEEDED = "succeeded"  # every stage and every domain job succeeded
    FAILED = "failed"  # a stage or a domain job failed; `error` says which
    STOPPED = "stopped"  # stopped by a user or the driver was interrupted

    def is_terminal(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED)


class JobState(str, Enum):
    PENDING = "pending"  # not reached yet
    QUEUED = "queued"  # submitted; waiting for the cluster to free resources
    RUNNING = "running"  # a worker reported that it started
    SUCCEEDED = "succeeded"  # outputs published and verified
    FAILED = "failed"  # gave up after its retries; `error` holds the cause
    SKIPPED = "skipped"  # not run because something it needs failed
    CACHED = "cached"  # not run: a verified output for the same inputs exists (orchestrator.run.cache)

    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.SKIPPED, JobState.CACHED)

    @property
    def done(self) -> bool:
        """Its outputs exist: computed in this run or reused from the cache."""
        return self in (JobState.SUCCEEDED, JobState.CACHED)


# Legal moves and why each happens; the docs' state diagrams are drawn from these tables.
RUN_TRANSITIONS: dict[RunState, dict[RunState, str]] = {
    RunState.PENDING: {RunState.RUNNING: "driver starts", RunState.FAILED: "driver failed before its first job",
                       RunState.STOPPED: "stopped before it started"},
    RunState.RUNNING: {RunState.SUCCEEDED: "every job succeeded", RunState.FAILED: "a stage or domain job failed",
                       RunState.STOPPED: "stop request or interrupt"},
    RunState.FAILED: {RunState.RUNNING: "resume"},
    RunState.STOPPED: {RunState.RUNNING: "resume"},
    RunState.SUCCEEDED: {},
}

JOB_TRANSITIONS: dict[JobState, dict[JobState, str]] = {
    JobState.PENDING: {JobState.QUEUED: "submitted to Ray", JobState.RUNNING: "ran in the driver",
                       JobState.SKIPPED: "something it needs failed", JobState.FAILED: "could not be submitted",
                       JobState.CACHED: "verified outputs for the same key exist"},
    JobState.QUEUED: {JobState.RUNNING: "a worker reported its start", JobState.FAILED: "failed before it started",
                      JobState.SKIPPED: "something it needs failed"},
    JobState.RUNNING: {JobState.SUCCEEDED: "outputs published and verified",
                       JobState.FAILED: "error, or its worker died"},
    JobState.FAILED: {JobState.QUEUED: "retry or resume", JobState.RUNNING: "Ray Train restarted its workers",
                      JobState.CACHED: "resume found verified outputs"},
    # like SUCCEEDED: redone only when what it scored changed
    JobState.CACHED: {JobState.QUEUED: "its inputs were recomputed"},
    JobState.SUCCEEDED: {JobState.QUEUED: "its inputs were recomputed"},
    JobState.SKIPPED: {JobState.QUEUED: "resume", JobState.CACHED: "resume found verified outputs"},
}


def state_diagram(table: dict[Enum, dict[Enum, str]], start: Enum) -> str:
    """A Mermaid state diagram of a transition table (what docs/architecture.md shows)."""
    lines = ["stateDiagram-v2", f"    [*] --> {start.value}"]
    for old, moves in table.items():
        lines += [f"    {old.value} --> {new.value}: {why}" for new, why in moves.items()]
    lines += [f"    {state.value} --> [*]" for state, moves in table.items() if not moves or state.is_terminal()]
    return "\n".join(lines) + "\n"


def diagrams_markdown() -> str:
    """The two diagrams as the docs hold them, between their ``generated`` markers."""
    return (f"Runs:\n\n```mermaid\n{state_diagram(RUN_TRANSITIONS, RunState.PENDING)}```\n\n"
            f"Jobs (a stage that runs once, or one domain's data, fine-tune, baseline or evaluation):\n\n"
            f"```mermaid\n{state_diagram(JOB_TRANSITIONS, JobState.PENDING)}```\n")


def new_run_id() -> str:
    """Sortable by time, unique across concurrent submitters: ``20261125-031500-a1b2c3``."""
    import secrets

    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class IllegalTransitionError(RuntimeError):
    """An internal bug: the driver tried a move the tables above do not allow."""


@dataclass
class JobRecord:
    name: str
    state: JobState = JobState.PENDING
    attempts: int = 0
    queued: float | None = None  # when it was last submitted
    started: float | None = None
    ended: float | None = None
    error: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per attempt
    # from the job graph (core.graph) when the run was created
    kind: str = ""  # tokenizer, data, pretrain, finetune, scratch, evaluate
    domain: str | None = None  # a domain job's domain; a data job's dataset
    parents: list[str] = field(default_factory=list)  # lineage order: the one it is drawn under first

    def __post_init__(self) -> None:
        # a record made without the graph (or saved before it existed): its name is "<kind>/<domain>"
        if not self.kind:
            kind, _, domain = self.name.partition("/")
            self.kind, self.domain = kind, self.domain or domain or None

    @property
    def seconds(self) -> float | None:
        return (self.ended - self.started) if self.started and self.ended else None


HEARTBEAT_S = 30.0  # how often a running driver writes its heartbeat


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
    jobs: dict[str, JobRecord] = field(default_factory=dict)  # stages and domain jobs by name
    tracking: dict[str, Any] = field(default_factory=dict)  # MLflow run ids (orchestrator.run.tracking)
    # when the driver last said it is alive (``beat``): how a driver on another host, or on a
    # cluster that cannot be reached, is known to be gone (``operate.control.refresh``)
    heartbeat: float | None = None

    # ---- transitions -------------------------------------------------------------

    def set_run_state(self, new: RunState, error: str | None = None) -> None:
        if new not in RUN_TRANSITIONS[self.state]:
            raise IllegalTransitionError(f"run {self.run_id}: {self.state.value} → {new.value}")
        self.state = new
        if new is RunState.RUNNING:
            self.started = self.started or time.time()
            self.ended, self.error = None, None
            self.heartbeat = time.time()
        if new.is_terminal():
            self.ended = time.time()
            self.error = error
        self.save()

    def set_job(self, name: str, new: JobState, *, error: str | None = None,
                when: float | None = None, outputs: dict[str, Any] | None = None,
                metrics: dict[str, Any] | None = None) -> JobRecord:
        rec = self.jobs.setdefault(name, JobRecord(name))
        if new is not rec.state:
            if new not in JOB_TRANSITIONS[rec.state]:
                raise IllegalTransitionError(f"{name}: {rec.state.value} → {new.value}")
            rec.state = new
            now = when or time.time()
            if new is JobState.RUNNING:
                rec.attempts += 1
                rec.started = rec.started or now
                rec.history.append({"attempt": rec.attempts, "state": new.value, "started": now,
                                    "ended": None, "error": None})
            elif rec.history and rec.history[-1]["ended"] is None and new is not JobState.QUEUED:
                rec.history[-1].update(state=new.value, ended=now, error=error)
            if new.is_terminal():
                rec.ended = now
            if new is JobState.QUEUED:
                rec.ended = None
                rec.queued = now
        if error is not None:
            rec.error = error
        rec.outputs.update(outputs or {})
        rec.metrics.update(metrics or {})
        self.save()
        return rec

    def beat(self, every_s: float = HEARTBEAT_S) -> None:
        """The driver is alive: say so in ``state.json`` (at most once every ``every_s``)."""
        now = time.time()
        if not self.state.is_terminal() and now - (self.heartbeat or 0) >= every_s:
            self.heartbeat = now
            self.save()

    def job(self, name: str) -> JobRecord:
        """The record of ``name``; a detached PENDING one when the run has no such job."""
        return self.jobs.get(name) or JobRecord(name)

    def of_kind(self, kind: str) -> dict[str, JobRecord]:
        """Jobs of one kind (``data``, ``finetune``, ``scratch``, ``evaluate``) by domain."""
        return {v.domain: v for v in self.jobs.values() if v.kind == kind and v.domain is not None}

    def domain_job(self, kind: str, domain: str) -> JobRecord:
        """The ``kind`` job of ``domain``; a detached PENDING one when the run has none."""
        return self.of_kind(kind).get(domain) or JobRecord(f"{kind}/{domain}")

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
        # durable: after a crash of the machine, state.json says what had happened, not less
        storage.write_text(self.state_uri, self.to_json())
        registry = getattr(self, "_registry", None)
        if registry is not None:
            registry.sync(self, **self._registry_extra)

    def interrupted(self, reason: str, run_state: RunState = RunState.FAILED,
                    run_error: str | None = None) -> None:
        """A driver ended (or died) mid-run: what it left RUNNING or QUEUED did not finish."""
        for name, rec in self.jobs.items():
            if rec.state in (JobState.QUEUED, JobState.RUNNING):
                self.set_job(name, JobState.FAILED, error=reason)
        # PENDING too: a driver that died before its first job (fingerprinting, a tracker, Ctrl-C)
        # would otherwise leave the run pending for ever (resume refuses it, schedules skip it)
        if self.state in (RunState.RUNNING, RunState.PENDING):
            self.set_run_state(run_state, error=run_error or reason)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        raw = json.loads(text)
        # runs recorded before 0.2 keep their jobs under "stages"
        saved = raw.pop("jobs") if "jobs" in raw else raw.pop("stages")
        jobs = {k: JobRecord(**{**v, "state": JobState(v["state"])}) for k, v in saved.items()}
        return cls(**{**raw, "state": RunState(raw["state"]), "jobs": jobs})

    @classmethod
    def load(cls, run_uri: str) -> RunRecord:
        return cls.from_json(storage.read_text(storage.join(run_uri, "state.json")))


if __name__ == "__main__":
    print(diagrams_markdown(), end="")
