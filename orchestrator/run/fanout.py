"""Fan-out: run many independent jobs concurrently, as many as the cluster holds.

Every job is submitted to Ray at once (up to ``max_in_flight``); Ray's scheduler runs
as many as fit and queues the rest, which is exactly "packed onto the cluster". A job
is QUEUED until its worker reports that it started, then RUNNING. One job failing never
stops the others; whether a failed job is tried again is its ``RetryPolicy``'s decision.

Single-worker jobs are Ray tasks. Multi-worker jobs (a domain with ``num_workers > 1``)
are Ray Train runs driven from a driver thread. Both are waited on as futures.

Three parts, each testable alone: ``RetryPolicy`` decides what a failure means (modelled
on Ray Train's ``FailurePolicy``: it sees the failure and says retry or fail, the loop
only carries the decision out); ``Tracked`` is everything the loop knows about one job
(attempts, when it was submitted, the starts it has seen, the newest step); ``FanOut``
is the loop that submits, watches the progress hub and records.
"""

from __future__ import annotations

import concurrent.futures as cf
import enum
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from branchout.orchestrator.run.state import JobState, RunRecord


class Decision(enum.Enum):
    RETRY = "retry"
    FAIL = "fail"


@dataclass(frozen=True)
class RetryPolicy:
    """What a failed attempt leads to.

    A job is tried again while it has retries left (each attempt resumes from the job's
    newest good checkpoint), except after a failure that would repeat: a NaN or infinite
    loss (``FloatingPointError`` from the training loop) recurs from the same checkpoint,
    data order and learning rate, so retrying it only spends the cluster's time.
    """

    max_retries: int = 0
    repeats: tuple[type[BaseException], ...] = (FloatingPointError,)

    def decide(self, attempt: int, error: BaseException) -> Decision:
        """``attempt``: the number of the attempt that failed (1 for the first)."""
        from branchout.orchestrator.run.ray_train import root_error

        if isinstance(root_error(error), self.repeats):
            return Decision.FAIL
        return Decision.RETRY if attempt <= self.max_retries else Decision.FAIL


@dataclass
class WorkItem:
    name: str  # the record key, e.g. "finetune/legal"
    submit: Callable[[], cf.Future]
    max_retries: int = 0
    on_success: Callable[[Any], dict[str, Any]] = dict  # result → outputs kept in the record
    rerun: bool = False  # run even if the record says it already succeeded
    resources: dict[str, float] | None = None  # one worker's bundle, for "waiting for capacity"
    key: str | None = None  # stage-cache key (orchestrator.run.cache)
    accept: Callable[[dict[str, Any]], bool] | None = None  # may these cached outputs stand in?

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_retries)


@dataclass
class Hooks:
    """What the caller hears from the loop (each optional)."""

    tick: Callable[[dict], None] = lambda snapshot: None  # every ~0.5 s, with the hub's snapshot
    waiting: Callable[[WorkItem, float], None] | None = None  # queued for patience_s (and again)
    note: Callable[[str], None] | None = None  # a line for the progress display
    done: Callable[[str, Any], None] = lambda name, rec: None  # a job ended for good


@dataclass
class Tracked:
    """One job as the loop sees it across its attempts in this driver (a resumed job
    starts afresh: its retries are counted again)."""

    item: WorkItem
    attempts: int = 0
    submitted: float = 0.0
    warned: int = 0  # "waiting for capacity" lines so far
    last_step: int = 0  # the newest step seen, for "died at step ~N"
    # start times of processes already recorded: after a quick failure the hub still shows
    # the dead attempt's "running" for a moment, and it must not pass for the retry
    seen_starts: set[float] = field(default_factory=set)
    warnings_seen: set[str] = field(default_factory=set)  # worker warnings already reported
    preemptions_seen: set[int] = field(default_factory=set)  # steps of preemption notices already reported
    extra: bool = False  # admitted beside the stage's jobs (run_jobs's ``more``): outside max_in_flight

    @property
    def name(self) -> str:
        return self.item.name

    def submit(self) -> cf.Future:
        self.attempts += 1
        self.submitted = time.time()
        return self.item.submit()

    def is_new_start(self, live: dict[str, Any]) -> bool:
        """Whether the hub's entry is a process of the current attempt not yet recorded."""
        return live.get("started", 0) >= self.submitted - 1 and live.get("started") not in self.seen_starts


def submit_task(fn: Callable, args: tuple, resources: dict[str, float], job: str,
                hub: str | None) -> cf.Future:
    """Run ``fn(*args)`` as a Ray task reserving ``resources``; it reports its start to the hub."""
    import ray

    bundle = dict(resources)
    cpus, gpus = bundle.pop("CPU", 1.0), bundle.pop("GPU", 0.0)
    task = ray.remote(_announce_and_call).options(
        num_cpus=cpus, num_gpus=gpus, resources=bundle or None, name=job, max_retries=0)
    return task.remote(fn, job, hub, *args).future()


def _announce_and_call(fn: Callable, job: str, hub: str | None, *args: Any) -> Any:
    from branchout.core.progress import announce

    announce(hub, job)
    return fn(*args)


def run_jobs(record: RunRecord, items: list[WorkItem], hub, hooks: Hooks | None = None,
             max_in_flight: int | None = None, patience_s: float = 300.0, cache=None,
             more: Callable[[], list[WorkItem]] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``items`` to completion; returns the recorded outputs of every succeeded item.

    ``more``: asked at the start and whenever a job ends for the jobs that can start now
    beside these (a fine-tuned model's evaluation once the model exists): they run in the
    same loop, outside ``max_in_flight``, and the loop ends when they have ended too.

    Items the record already shows as succeeded (a resumed run) are not run again unless
    ``rerun`` is set; their recorded outputs are returned as they are. An item queued for
    longer than ``patience_s`` is reported through ``hooks.waiting`` (and again every
    ``patience_s``), so a run waiting for capacity says what it waits for. With a ``cache``
    (``orchestrator.run.cache.StageCache``) an item whose key has verified outputs is marked
    ``cached`` instead of run, and every item that succeeds is recorded there.

    A Ray Train job whose worker group restarts inside one attempt (a worker died; Ray
    Train restarted the group from the newest checkpoint) reports a new rank-0 process: the
    attempt is recorded as failed ("worker died at step ~N; restarted from step S"), a new
    attempt begins, and ``hooks.note`` says so on the progress display. ``hooks.done(name,
    record)`` hears of every job that ends for good: succeeded, cached, or failed for good.
    """
    return FanOut(record, hub, hooks or Hooks(), max_in_flight, patience_s, cache).run(items, more)


class FanOut:
    """The loop behind ``run_jobs``: submit, watch, record, until every job has ended."""

    def __init__(self, record: RunRecord, hub, hooks: Hooks, max_in_flight: int | None,
                 patience_s: float, cache) -> None:
        self.record, self.hub, self.hooks = record, hub, hooks
        self.max_in_flight, self.patience_s, self.cache = max_in_flight, patience_s, cache
        self.outputs: dict[str, dict[str, Any]] = {}
        self.pending: deque[Tracked] = deque()
        self.running: dict[cf.Future, Tracked] = {}
        self.hub_lost = False  # said once: a hub that stops answering costs only live numbers

    def run(self, items: list[WorkItem], more: Callable[[], list[WorkItem]] | None = None) -> dict[str, dict[str, Any]]:
        self.pending.extend(Tracked(item) for item in items if not self._already_done(item))
        self._admit(more)
        while self.pending or self.running:
            self._submit_pending()
            finished, _ = cf.wait(list(self.running), timeout=0.5, return_when=cf.FIRST_COMPLETED)
            snapshot, problem = _snapshot(self.hub)
            if problem and not self.hub_lost and self.hooks.note:
                self.hub_lost = True
                self.hooks.note(f"live progress unavailable ({problem}); jobs go on, each recorded from its result")
            now = time.time()
            for job in self.running.values():
                self._observe(job, snapshot.get(job.name, {}), now)
            for future in finished:
                self._finish(self.running.pop(future), future, snapshot)
            if finished:
                self._admit(more)
            self.hooks.tick(snapshot)
        return self.outputs

    def _submit_pending(self) -> None:
        """Submit, in order, what may start: every admitted job, and the stage's own up to
        ``max_in_flight`` (which holds back only those)."""
        held = sum(not job.extra for job in self.running.values())
        waiting: deque[Tracked] = deque()
        for job in self.pending:
            if not job.extra and self.max_in_flight is not None and held >= self.max_in_flight:
                waiting.append(job)
                continue
            held += not job.extra
            self.record.set_job(job.name, JobState.QUEUED)
            self.running[job.submit()] = job
        self.pending = waiting

    def _admit(self, more: Callable[[], list[WorkItem]] | None) -> None:
        """The jobs ``more`` says can start now, queued behind the stage's own."""
        if more is not None:
            self.pending.extend(Tracked(item, extra=True) for item in more() if not self._already_done(item))

    def _already_done(self, item: WorkItem) -> bool:
        """Succeeded earlier in this run (resume) or cached: its outputs stand, nothing runs."""
        rec = self.record.job(item.name)
        if rec.state.done and not item.rerun:
            self.outputs[item.name] = rec.outputs
            return True
        hit = self.cache.lookup(item.name, item.key) if self.cache is not None and item.key else None
        if hit is not None and (item.accept is None or item.accept(hit)):
            self.outputs[item.name] = self.record.set_job(item.name, JobState.CACHED, outputs=hit).outputs
            self.hooks.done(item.name, self.record.job(item.name))
            return True
        return False

    def _observe(self, job: Tracked, live: dict[str, Any], now: float) -> None:
        """What the hub says of a job in flight: still waiting, started, or restarted."""
        state = self.record.job(job.name).state
        waited = now - job.submitted
        if self.hooks.waiting and state is JobState.QUEUED and waited >= self.patience_s * (1 + job.warned):
            job.warned += 1
            self.hooks.waiting(job.item, waited)
        process = {k: live[k] for k in ("pid", "node") if k in live}
        if live.get("state") == "running" and job.is_new_start(live) and state is JobState.QUEUED:
            job.seen_starts.add(live["started"])
            self.record.set_job(job.name, JobState.RUNNING, when=live.get("started"), outputs=process)
        elif _restarted(self.record.job(job.name), live) and live.get("started") not in job.seen_starts:
            job.seen_starts.add(live["started"])
            preempted = live.get("preempted_at")
            if preempted is not None and preempted not in job.preemptions_seen:
                # not a failure: the job checkpointed on a preemption notice and goes on elsewhere
                job.preemptions_seen.add(preempted)
                note = (f"preempted at step {preempted} (checkpointed there); continuing on the nodes that remain "
                        f"from step {live.get('resumed_from', 0)}")
                kept = [*self.record.job(job.name).outputs.get("warnings", []), note]
                self.record.set_job(job.name, JobState.RUNNING, outputs={**process, "warnings": kept})
            else:
                note = f"worker died at step ~{job.last_step}; restarted from step {live.get('resumed_from', 0)}"
                self.record.set_job(job.name, JobState.FAILED, error=note)
                self.record.set_job(job.name, JobState.RUNNING, when=live.get("started"), outputs=process)
            if self.hooks.note:
                self.hooks.note(f"{job.name}: {note}")
        if self.record.job(job.name).state is JobState.RUNNING and "step" in live:
            job.last_step = live["step"]
        self._warnings(job, live)

    def _warnings(self, job: Tracked, live: dict[str, Any]) -> None:
        """What a worker warned of (a damaged checkpoint it skipped when it resumed, tracking
        that stopped): said on the terminal and kept in the job's record (status, the report),
        once each."""
        said = [f"skipped damaged checkpoint: {w}" for w in live.get("checkpoint_warnings") or []]
        said += list(live.get("warnings") or [])  # MetricsLogger.warn: tracking that stopped, and the like
        new = [w for w in said if w not in job.warnings_seen]
        if not new:
            return
        job.warnings_seen.update(new)
        kept = [*self.record.job(job.name).outputs.get("warnings", []), *new]
        self.record.set_job(job.name, self.record.job(job.name).state, outputs={"warnings": kept})
        for line in new:
            if self.hooks.note:
                self.hooks.note(f"{job.name}: {line}")

    def _finish(self, job: Tracked, future: cf.Future, snapshot: dict) -> None:
        try:
            result = future.result()
        except Exception as e:  # any job error is recorded, never propagated
            self._failed(job, e, snapshot.get(job.name, {}))
            return
        if self.record.job(job.name).state is JobState.QUEUED:
            self.record.set_job(job.name, JobState.RUNNING, when=_started(result))
        produced = job.item.on_success(result)
        if job.item.key:
            produced["key"] = job.item.key
        rec = self.record.set_job(job.name, JobState.SUCCEEDED, when=_ended(result), outputs=produced)
        self.outputs[job.name] = rec.outputs
        if self.cache is not None and job.item.key:
            self.cache.store(job.name, job.item.key, self.record.run_id, produced)
        self.hooks.done(job.name, rec)

    def _failed(self, job: Tracked, error: Exception, live: dict[str, Any]) -> None:
        if "started" in live:  # the dead attempt's hub entry must not pass for the retry's start
            job.seen_starts.add(live["started"])
        if self.record.job(job.name).state is JobState.QUEUED:
            self.record.set_job(job.name, JobState.RUNNING)
        self.record.set_job(job.name, JobState.FAILED, error=describe_error(error))
        if job.item.policy.decide(job.attempts, error) is Decision.RETRY:
            self.pending.append(job)
        else:
            self.hooks.done(job.name, self.record.job(job.name))


def _restarted(rec, live: dict[str, Any]) -> bool:
    """A new rank-0 process of the same attempt: Ray Train restarted the worker group."""
    if rec.state is not JobState.RUNNING or not rec.history or "pid" not in live:
        return False
    return (live.get("pid") != rec.outputs.get("pid")
            and live.get("started", 0) > (rec.history[-1]["started"] or 0))


def _snapshot(hub) -> tuple[dict[str, dict[str, Any]], str | None]:
    """What the progress hub knows of every job, and why not when it did not answer."""
    if hub is None:
        return {}, None
    import ray

    try:
        return ray.get(hub.snapshot.remote(), timeout=5), None
    except Exception as e:  # a slow or lost hub only costs the live numbers, but it is said
        return {}, describe_error(e)


def _started(result: Any) -> float | None:
    return result.get("started") if isinstance(result, dict) else None


def _ended(result: Any) -> float | None:
    return result.get("ended") if isinstance(result, dict) else None


def describe_error(error: BaseException) -> str:
    """One line: the root error of a Ray task failure, not Ray's wrapper text."""
    from branchout.orchestrator.run.ray_train import root_cause

    cause = getattr(error, "cause", None)
    if cause is not None:
        return root_cause(cause)
    text = "".join(traceback.format_exception_only(type(error), error)).strip().splitlines()
    return root_cause(error) if not text else text[-1]
