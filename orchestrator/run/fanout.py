"""Fan-out: run many independent jobs concurrently, as many as the cluster holds.

Every job is submitted to Ray at once (up to ``max_in_flight``); Ray's scheduler runs
as many as fit and queues the rest, which is exactly "packed onto the cluster". A job
is QUEUED until its worker reports that it started, then RUNNING. One job failing never
stops the others; a failed job is resubmitted up to its ``max_retries``.

Single-worker jobs are Ray tasks. Multi-worker jobs (a domain with ``num_workers > 1``)
are Ray Train runs driven from a driver thread. Both are waited on as futures.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from branchout.orchestrator.run.state import JobState, RunRecord


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


def run_jobs(record: RunRecord, items: list[WorkItem], hub, on_tick: Callable[[dict], None],
             max_in_flight: int | None = None, on_wait: Callable[[WorkItem, float], None] | None = None,
             patience_s: float = 300.0, cache=None, on_note: Callable[[str], None] | None = None,
             on_done: Callable[[str, Any], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``items`` to completion; returns the recorded outputs of every succeeded item.

    Items the record already shows as succeeded (a resumed run) are not run again unless
    ``rerun`` is set; their recorded outputs are returned as they are. An item queued for
    longer than ``patience_s`` is reported through ``on_wait`` (and again every
    ``patience_s``), so a run waiting for capacity says what it waits for. With a ``cache``
    (``orchestrator.run.cache.StageCache``) an item whose key has verified outputs is marked
    ``cached`` instead of run, and every item that succeeds is recorded there.

    A Ray Train job whose worker group restarts inside one attempt (a worker died; Ray
    Train restarted the group from the newest checkpoint) reports a new rank-0 process: the
    attempt is recorded as failed ("worker died at step ~N; restarted from step S"), a new
    attempt begins, and ``on_note`` says so on the progress display. ``on_done(name,
    record)`` hears of every job that ends for good: succeeded, cached, or failed after
    its last retry.
    """
    on_done = on_done or (lambda name, rec: None)
    outputs: dict[str, dict[str, Any]] = {}
    pending: deque[WorkItem] = deque()
    for item in items:
        rec = record.job(item.name)
        if rec.state.done and not item.rerun:
            outputs[item.name] = rec.outputs
            continue
        hit = cache.lookup(item.name, item.key) if cache is not None and item.key else None
        if hit is not None and (item.accept is None or item.accept(hit)):
            outputs[item.name] = record.set_job(item.name, JobState.CACHED, outputs=hit).outputs
            on_done(item.name, record.job(item.name))
            continue
        pending.append(item)
    running: dict[cf.Future, WorkItem] = {}
    tries: dict[str, int] = {}  # attempts in this driver; a resumed job gets its retries afresh
    submitted: dict[str, float] = {}
    warned: dict[str, int] = {}
    last_step: dict[str, int] = {}  # the newest step seen per job, for "died at step ~N"
    # start times of processes already recorded per job: after a quick failure the hub still
    # shows the dead attempt's "running" for a moment, and it must not pass for the retry
    seen_starts: dict[str, set[float]] = {}
    limit = max_in_flight or len(pending) or 1
    while pending or running:
        while pending and len(running) < limit:
            item = pending.popleft()
            record.set_job(item.name, JobState.QUEUED)
            tries[item.name] = tries.get(item.name, 0) + 1
            submitted[item.name] = time.time()
            running[item.submit()] = item
        done, _ = cf.wait(list(running), timeout=0.5, return_when=cf.FIRST_COMPLETED)
        snapshot = _snapshot(hub)
        now = time.time()
        for item in running.values():
            waited = now - submitted[item.name]
            if (on_wait and record.job(item.name).state is JobState.QUEUED
                    and waited >= patience_s * (1 + warned.get(item.name, 0))):
                warned[item.name] = warned.get(item.name, 0) + 1
                on_wait(item, waited)
            live = snapshot.get(item.name, {})
            # the hub still holds a failed attempt's "running"; only a newer start counts
            fresh = (live.get("started", 0) >= submitted[item.name] - 1
                     and live.get("started") not in seen_starts.get(item.name, ()))
            if live.get("state") == "running" and fresh and record.job(item.name).state is JobState.QUEUED:
                seen_starts.setdefault(item.name, set()).add(live["started"])
                record.set_job(item.name, JobState.RUNNING, when=live.get("started"),
                                 outputs={k: live[k] for k in ("pid", "node") if k in live})
            elif _restarted(record.job(item.name), live) and live.get("started") not in seen_starts.get(item.name, ()):
                seen_starts.setdefault(item.name, set()).add(live["started"])
                note = (f"worker died at step ~{last_step.get(item.name, 0)}; "
                        f"restarted from step {live.get('resumed_from', 0)}")
                record.set_job(item.name, JobState.FAILED, error=note)
                record.set_job(item.name, JobState.RUNNING, when=live.get("started"),
                                 outputs={k: live[k] for k in ("pid", "node") if k in live})
                if on_note:
                    on_note(f"{item.name}: {note}")
            if record.job(item.name).state is JobState.RUNNING and "step" in live:
                last_step[item.name] = live["step"]
        for future in done:
            item = running.pop(future)
            try:
                result = future.result()
            except Exception as e:  # any job error is recorded, never propagated
                if "started" in snapshot.get(item.name, {}):
                    seen_starts.setdefault(item.name, set()).add(snapshot[item.name]["started"])
                if record.job(item.name).state is JobState.QUEUED:
                    record.set_job(item.name, JobState.RUNNING)
                record.set_job(item.name, JobState.FAILED, error=describe_error(e))
                if tries[item.name] <= item.max_retries:
                    pending.append(item)
                else:
                    on_done(item.name, record.job(item.name))
                continue
            if record.job(item.name).state is JobState.QUEUED:
                record.set_job(item.name, JobState.RUNNING, when=_started(result))
            produced = item.on_success(result)
            if item.key:
                produced["key"] = item.key
            rec = record.set_job(item.name, JobState.SUCCEEDED, when=_ended(result), outputs=produced)
            outputs[item.name] = rec.outputs
            if cache is not None and item.key:
                cache.store(item.name, item.key, record.run_id, produced)
            on_done(item.name, rec)
        on_tick(snapshot)
    return outputs


def _restarted(rec, live: dict[str, Any]) -> bool:
    """A new rank-0 process of the same attempt: Ray Train restarted the worker group."""
    if rec.state is not JobState.RUNNING or not rec.history or "pid" not in live:
        return False
    return (live.get("pid") != rec.outputs.get("pid")
            and live.get("started", 0) > (rec.history[-1]["started"] or 0))


def _snapshot(hub) -> dict[str, dict[str, Any]]:
    if hub is None:
        return {}
    import ray

    try:
        return ray.get(hub.snapshot.remote(), timeout=5)
    except Exception:  # a slow or lost hub only costs the live numbers
        return {}


def _started(result: Any) -> float | None:
    return result.get("started") if isinstance(result, dict) else None


def _ended(result: Any) -> float | None:
    return result.get("ended") if isinstance(result, dict) else None


def describe_error(error: BaseException) -> str:
    """One line: the root error of a Ray task failure, not Ray's wrapper text."""
    from branchout.orchestrator.run.training import root_cause

    cause = getattr(error, "cause", None)
    if cause is not None:
        return root_cause(cause)
    text = "".join(traceback.format_exception_only(type(error), error)).strip().splitlines()
    return root_cause(error) if not text else text[-1]
