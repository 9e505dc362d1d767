"""`fanout.run_jobs`, the retry loop every stage goes through, with fake jobs (no Ray):
retries, failures that stay local, the in-flight limit, cached and finished items, stopping."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import pytest

from branchout.orchestrator.run.fanout import Decision, Hooks, RetryPolicy, WorkItem, run_jobs
from branchout.orchestrator.run.state import JobRecord, JobState, RunRecord


@pytest.fixture
def record(tmp_path):
    rec = RunRecord(run_id="r", pipeline="p", run_uri=str(tmp_path / "run"), spec_hash="h")
    rec.save()
    return rec


@pytest.fixture
def pool():
    with cf.ThreadPoolExecutor(8) as executor:
        yield executor


class Job:
    """A fake job: fails its first ``failures`` attempts, records how many ran at once."""

    running = 0
    most = 0
    lock = threading.Lock()

    def __init__(self, pool, name: str, failures: int = 0, seconds: float = 0.05):
        self.pool, self.name, self.failures, self.seconds, self.attempts = pool, name, failures, seconds, 0

    def submit(self) -> cf.Future:
        self.attempts += 1
        return self.pool.submit(self._run, self.attempts)

    def _run(self, attempt: int) -> dict:
        with Job.lock:
            Job.running += 1
            Job.most = max(Job.most, Job.running)
        try:
            time.sleep(self.seconds)
            if attempt <= self.failures:
                raise RuntimeError(f"{self.name} attempt {attempt} broke")
            return {"started": time.time() - self.seconds, "ended": time.time(), "value": attempt}
        finally:
            with Job.lock:
                Job.running -= 1


def _items(jobs, retries=0):
    return [WorkItem(j.name, j.submit, max_retries=retries, on_success=lambda r: {"value": r["value"]}) for j in jobs]


def test_failed_attempts_are_retried_and_recorded(record, pool):
    flaky, fine = Job(pool, "flaky", failures=2), Job(pool, "fine")
    out = run_jobs(record, _items([flaky, fine], retries=2), None)
    assert out == {"flaky": {"value": 3}, "fine": {"value": 1}}
    rec = record.job("flaky")
    assert rec.state is JobState.SUCCEEDED and rec.attempts == 3
    assert [h["state"] for h in rec.history] == ["failed", "failed", "succeeded"]
    assert rec.history[0]["error"] == "RuntimeError: flaky attempt 1 broke"


def test_a_job_out_of_retries_fails_alone(record, pool):
    broken, fine = Job(pool, "broken", failures=5), Job(pool, "fine")
    out = run_jobs(record, _items([broken, fine], retries=1), None)
    assert set(out) == {"fine"}
    assert record.job("broken").state is JobState.FAILED and broken.attempts == 2
    assert record.job("fine").state is JobState.SUCCEEDED


def test_in_flight_limit_holds(record, pool):
    Job.most = 0
    jobs = [Job(pool, f"j{i}", seconds=0.2) for i in range(6)]
    run_jobs(record, _items(jobs), None, max_in_flight=2)
    assert Job.most == 2 and all(record.job(j.name).state is JobState.SUCCEEDED for j in jobs)


def test_jobs_admitted_beside_start_once_their_parent_ends_outside_the_limit(record, pool):
    """``more``: an evaluation starts as soon as the job it reads is done, while the stage's
    other jobs still run (not after all of them), and max_in_flight holds back only the
    stage's own jobs; the loop ends when the admitted ones have ended too."""
    ran = {"evaluate/quick": threading.Event(), "queued": threading.Event()}

    class Marks(Job):
        def _run(self, attempt: int) -> dict:
            ran[self.name].set()
            return super()._run(attempt)

    class WaitsForThem(Job):  # ends only once both have run: were they held behind it, it fails
        def _run(self, attempt: int) -> dict:
            if not all(e.wait(60) for e in ran.values()):
                raise RuntimeError("the evaluation or the third job waited for this one")
            return super()._run(attempt)

    quick, slow, queued = Job(pool, "quick"), WaitsForThem(pool, "slow"), Marks(pool, "queued")
    scored = Marks(pool, "evaluate/quick")
    asked: list[set[str]] = []

    def more():
        done = {n for n, r in record.jobs.items() if r.state is JobState.SUCCEEDED}
        asked.append(done)
        return _items([scored]) if "quick" in done and scored.attempts == 0 else []

    # the limit of 2: "queued" starts when "quick" ends, though the evaluation started then too
    run_jobs(record, _items([quick, slow, queued]), None, max_in_flight=2, more=more)
    assert asked[0] == set()  # asked before anything ran: nothing was ready yet
    assert scored.attempts == 1 and slow.attempts == 1
    assert all(record.job(n).state is JobState.SUCCEEDED for n in ("quick", "slow", "queued", "evaluate/quick"))


def test_finished_jobs_are_not_run_again(record, pool):
    record.jobs["done"] = JobRecord("done", state=JobState.SUCCEEDED, outputs={"value": "earlier"})
    done = Job(pool, "done")
    out = run_jobs(record, _items([done]), None)
    assert out == {"done": {"value": "earlier"}} and done.attempts == 0


def test_a_stop_request_leaves_unfinished_jobs_for_the_driver_to_record(record, pool):
    class Stop(Exception):
        pass

    ticks = []

    def tick(snapshot):
        ticks.append(1)
        if len(ticks) == 2:
            raise Stop

    slow = Job(pool, "slow", seconds=5)
    with pytest.raises(Stop):
        run_jobs(record, _items([slow]), None, Hooks(tick=tick))
    assert record.job("slow").state is JobState.QUEUED  # the driver's interrupted() records the end
    record.interrupted("stopped before it finished")
    assert record.job("slow").state is JobState.FAILED


def test_a_quick_retry_is_not_mistaken_for_a_restart(record, pool, monkeypatch):
    """After an attempt dies within a second, the hub still shows its "running" entry while
    the retry is queued: that entry must not be taken for the retry's process, or the
    retry's own start later reads as a second death ("worker died ... restarted")."""
    hub: dict[str, dict] = {}
    monkeypatch.setattr("branchout.orchestrator.run.fanout._snapshot", lambda h: ({k: dict(v) for k, v in hub.items()}, None))

    def run(attempt: int) -> dict:
        if attempt == 2:
            time.sleep(0.8)  # the retry's process takes a moment to start and post
        hub["quick"] = {"state": "running", "pid": 1000 + attempt, "started": time.time()}
        time.sleep(0.8 if attempt == 2 else 0.6)
        if attempt == 1:
            raise RuntimeError("worker process died")
        return {"started": hub["quick"]["started"], "ended": time.time(), "value": attempt}

    attempts = []

    def submit() -> cf.Future:
        attempts.append(len(attempts) + 1)
        return pool.submit(run, attempts[-1])

    notes: list[str] = []
    item = WorkItem("quick", submit, max_retries=2, on_success=lambda r: {"value": r["value"]})
    out = run_jobs(record, [item], object(), Hooks(note=notes.append))
    rec = record.job("quick")
    assert out["quick"]["value"] == 2
    assert rec.attempts == 2 and [h["state"] for h in rec.history] == ["failed", "succeeded"], rec.history
    assert rec.outputs["pid"] == 1002 and not notes


def test_retry_policy_alone():
    """Retries while attempts are left; never after a failure that would repeat (a NaN loss),
    however deeply Ray wrapped it."""
    from ray.exceptions import RayTaskError

    policy = RetryPolicy(max_retries=2)
    broke = RuntimeError("worker process died")
    assert [policy.decide(n, broke) for n in (1, 2, 3)] == [Decision.RETRY, Decision.RETRY, Decision.FAIL]
    assert RetryPolicy(0).decide(1, broke) is Decision.FAIL
    nan = FloatingPointError("loss is nan in steps 3-4; lower the learning rate")
    assert policy.decide(1, nan) is Decision.FAIL
    wrapped = RayTaskError("train", "Traceback ...", nan).as_instanceof_cause()  # as a Ray task raises it
    assert policy.decide(1, wrapped) is Decision.FAIL
    try:
        try:
            raise wrapped
        except Exception as e:
            raise RuntimeError("training failed") from e  # as the Ray Train launcher re-raises
    except RuntimeError as chained:
        assert policy.decide(1, chained) is Decision.FAIL
    assert policy.decide(1, RayTaskError("train", "tb", broke).as_instanceof_cause()) is Decision.RETRY


def test_a_failure_that_would_repeat_is_not_retried(record, pool):
    class Diverges(Job):
        def _run(self, attempt: int) -> dict:
            raise FloatingPointError("loss is nan in steps 1-2; lower the learning rate")

    nan, flaky = Diverges(pool, "nan"), Job(pool, "flaky", failures=1)
    ended: list[str] = []
    out = run_jobs(record, _items([nan, flaky], retries=3), None, Hooks(done=lambda name, rec: ended.append(name)))
    assert nan.attempts == 1 and record.job("nan").state is JobState.FAILED
    assert "lower the learning rate" in record.job("nan").history[-1]["error"]
    assert flaky.attempts == 2 and out == {"flaky": {"value": 2}}
    assert sorted(ended) == ["flaky", "nan"]  # each heard of once, when it ended for good


def test_a_workers_warning_reaches_the_terminal_and_the_record_once(record, pool, monkeypatch):
    """A damaged checkpoint a worker skipped when it resumed is said by the driver (a note on
    the terminal) and kept in the job's record for `branchout status` and the report."""
    from branchout.orchestrator.run.report import job_warnings

    hub: dict[str, dict] = {}
    monkeypatch.setattr("branchout.orchestrator.run.fanout._snapshot", lambda h: ({k: dict(v) for k, v in hub.items()}, None))
    skipped = "checkpoint …/step_00000020 is damaged: state.pt: SHA-256 mismatch (corrupted)"

    def run() -> dict:
        hub["warned"] = {"state": "running", "pid": 7, "started": time.time(), "checkpoint_warnings": [skipped]}
        time.sleep(1.2)  # several of the loop's ticks see the same warning
        return {"started": hub["warned"]["started"], "ended": time.time(), "value": 1}

    notes: list[str] = []
    item = WorkItem("warned", lambda: pool.submit(run), on_success=lambda r: {"value": r["value"]})
    run_jobs(record, [item], object(), Hooks(note=notes.append))
    assert notes == [f"warned: skipped damaged checkpoint: {skipped}"]
    assert record.job("warned").state is JobState.SUCCEEDED
    assert record.job("warned").outputs["warnings"] == [f"skipped damaged checkpoint: {skipped}"]
    assert job_warnings(record) == [f"warned: skipped damaged checkpoint: {skipped}"]


def test_a_preempted_job_going_on_elsewhere_is_said_once_and_not_recorded_as_a_failure(record, pool, monkeypatch):
    """A pretrain that checkpointed on a preemption notice starts a new worker group (a new
    rank-0 process): the driver says why, keeps it among the job's warnings, and does not
    record a worker death."""
    hub: dict[str, dict] = {}
    monkeypatch.setattr("branchout.orchestrator.run.fanout._snapshot", lambda h: ({k: dict(v) for k, v in hub.items()}, None))

    def seen(predicate) -> None:  # the loop has recorded what the hub says: go on
        deadline = time.time() + 30
        while not predicate(record.job("pretrain")):
            assert time.time() < deadline
            time.sleep(0.05)

    def run() -> dict:
        hub["pretrain"] = {"state": "running", "pid": 1, "started": time.time()}
        seen(lambda rec: rec.outputs.get("pid") == 1)
        hub["pretrain"].update(state="preempted", preempted_at=21)  # rank 0 of the first group
        hub["pretrain"].update(state="running", pid=2, started=time.time() + 1, resumed_from=21)
        seen(lambda rec: rec.outputs.get("pid") == 2)
        return {"started": hub["pretrain"]["started"], "ended": time.time(), "value": 1}

    notes: list[str] = []
    item = WorkItem("pretrain", lambda: pool.submit(run), on_success=lambda r: {"value": r["value"]})
    run_jobs(record, [item], object(), Hooks(note=notes.append))
    line = "preempted at step 21 (checkpointed there); continuing on the nodes that remain from step 21"
    rec = record.job("pretrain")
    assert notes == [f"pretrain: {line}"]
    assert rec.state is JobState.SUCCEEDED and rec.attempts == 1 and [h["state"] for h in rec.history] == ["succeeded"]
    assert rec.outputs["warnings"] == [line]


def test_a_hub_that_stops_answering_is_said_once_and_the_jobs_go_on(record, pool):
    """The progress hub (a Ray actor) lost or stuck: the loop says so once and records every
    job from its result, as it would have."""

    class Broken:
        class snapshot:  # noqa: N801 (the actor method's name)
            @staticmethod
            def remote():
                raise ConnectionError("the hub's node is gone")

    notes: list[str] = []
    jobs = [Job(pool, f"j{i}", seconds=0.6) for i in range(2)]
    out = run_jobs(record, _items(jobs), Broken(), Hooks(note=notes.append))
    assert notes == ["live progress unavailable (ConnectionError: the hub's node is gone); jobs go on, each "
                     "recorded from its result"]
    assert {name: o["value"] for name, o in out.items()} == {"j0": 1, "j1": 1}
    assert all(record.job(j.name).state is JobState.SUCCEEDED for j in jobs)


def test_tracking_that_stopped_in_a_worker_reaches_the_terminal_and_the_record(record, pool, monkeypatch, tmp_path):
    """MLflow (or TensorBoard) failing inside a worker: the worker's MetricsLogger says it to the
    driver through the hub, which shows it once and keeps it with the job."""
    from branchout.stages.training.metrics import MetricsLogger

    logger = MetricsLogger("finetune/qa", str(tmp_path / "logs"), None, 10,
                           tracking={"uri": f"file://{tmp_path / 'mlruns'}", "run_id": "no-such-run"})
    logger.log(1, loss=2.0)  # the tracking server refuses the run: the job goes on
    logger.log(2, loss=1.5)
    logger.close()
    [warning] = logger.warnings
    assert warning.startswith(f"MLflow tracking at file://{tmp_path / 'mlruns'} stopped: ")
    logged = (tmp_path / "logs" / "finetune-qa.metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [1, 2]

    hub: dict[str, dict] = {}
    monkeypatch.setattr("branchout.orchestrator.run.fanout._snapshot", lambda h: ({k: dict(v) for k, v in hub.items()}, None))

    def run() -> dict:
        hub["finetune/qa"] = {"state": "running", "pid": 7, "started": time.time(), "warnings": logger.warnings}
        time.sleep(1.2)  # several of the loop's ticks see the same warning: said once
        return {"started": hub["finetune/qa"]["started"], "ended": time.time(), "value": 1}

    notes: list[str] = []
    run_jobs(record, [WorkItem("finetune/qa", lambda: pool.submit(run), on_success=lambda r: {"value": r["value"]})],
             object(), Hooks(note=notes.append))
    assert notes == [f"finetune/qa: {warning}"]
    assert record.job("finetune/qa").outputs["warnings"] == [warning]
