"""Operating runs after they start: submit, refresh, stop, resume.

A run is either *local* (``branchout run``: the driver is a process on some host, its
pid in the registry) or *submitted* (a Ray job on a cluster, its submission ids in the
registry). Either way its driver writes ``state.json`` into run storage; this module
reads it back, asks Ray about submitted drivers, and acts.

When a driver is known to be gone (Ray says its job ended, or its local process no
longer exists) while ``state.json`` still says ``running``, the run is marked as
interrupted here: nothing else would ever finish that record.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from branchout import storage
from branchout.orchestrator.operate.jobs import (
    TERMINAL_JOB_STATES,
    JobNotFound,
    JobsClient,
    JobsError,
)
from branchout.orchestrator.operate.registry import Registry, RunRow
from branchout.orchestrator.run.state import RunRecord, RunState, new_run_id


class OperateError(RuntimeError):
    """The requested operation does not apply to this run; one line for the user."""


@dataclass
class RunView:
    row: RunRow
    record: RunRecord | None  # None when run storage cannot be read from here
    job_status: str | None = None  # Ray job status of the newest submission
    note: str | None = None
    driver_gone: bool = False  # known now: its newest driver is not running (nor about to)


def source_of(row: RunRow) -> dict:
    try:
        return json.loads(row.source) if row.source else {}
    except json.JSONDecodeError:
        return {"path": row.source, "overrides": []}


def submit_pipeline(spec, source: dict, address: str, registry: Registry, working_dir: str | None = None,
                    pip: list[str] | None = None, options: dict | None = None,
                    say: Callable[[str], None] = print) -> RunRecord:
    """Submit the driver of a new run as a Ray job; returns the (pending) run record.

    Before anything is submitted the cluster must be able to use the storage
    (``probe_storage``), and every local input is shipped (``orchestrator.operate.inputs``): the
    driver reads the rewritten paths, so the client may go away once this returns.
    """
    from branchout.orchestrator.operate.inputs import ship_inputs
    from branchout.orchestrator.operate.jobs import (
        driver_entrypoint,
        forwarded_env,
        job_metadata,
        probe_storage,
    )
    from branchout.orchestrator.run.driver import spec_hash

    run_id = new_run_id()
    record = RunRecord(run_id=run_id, pipeline=spec.name, spec_hash=spec_hash(spec),
                       run_uri=storage.join(spec.storage, spec.name, run_id))
    client = JobsClient(address)
    probe_storage(client, spec.storage)
    shipment = ship_inputs(spec, working_dir)
    for line in shipment.lines:
        say(f"input {line}")
    env = {"BRANCHOUT_SPEC": shipment.spec.model_dump_json(), "BRANCHOUT_SOURCE": json.dumps(source),
           "BRANCHOUT_SPEC_HASH": record.spec_hash, "BRANCHOUT_RUN_OPTIONS": json.dumps(options or {}),
           **forwarded_env()}
    client.submit(run_id, driver_entrypoint("--run-id", run_id), env, job_metadata(spec.name, run_id),
                  working_dir=shipment.working_dir or working_dir, pip=pip)
    registry.register_submission(record, address, run_id, json.dumps(source))
    return record


# A running driver writes its heartbeat every RunRecord.HEARTBEAT_S; one silent this long is gone.
LOST_AFTER_S = 600.0


def refresh(registry: Registry, row: RunRow, lost_after_s: float = LOST_AFTER_S) -> RunView:
    """Read the run's state.json and its driver's liveness; mark it interrupted if the driver is gone.

    Gone means: Ray says its job ended; the cluster answers but no longer knows the job (it
    was restarted: a lost head); its local process no longer exists; or, where none of these
    can be asked (a cluster out of reach, a driver on another host), its heartbeat is older
    than ``lost_after_s``.
    """
    view = RunView(row=row, record=None)
    try:
        view.record = RunRecord.load(row.run_uri)
    except (OSError, ValueError, KeyError) as e:
        view.note = f"cannot read {row.run_uri}/state.json from here ({type(e).__name__})"
    driver_gone, how = False, None
    if row.submitted and row.submissions:
        try:
            view.job_status = JobsClient(row.address).status(row.submissions[-1])
            driver_gone = view.job_status in TERMINAL_JOB_STATES
        except JobNotFound:
            driver_gone, how = True, f"the cluster at {row.address} no longer knows its Ray job (restarted)"
        except JobsError as e:
            view.note = str(e)
            driver_gone, how = _silent(view.record, lost_after_s)
    elif row.driver_host == socket.gethostname() and row.driver_pid:
        driver_gone = not _alive(row.driver_pid)
    elif row.driver_host:  # driven from another host: only its heartbeat says
        driver_gone, how = _silent(view.record, lost_after_s)
    view.driver_gone = driver_gone
    record = view.record
    if record is None and driver_gone and view.job_status and not RunState(row.state).is_terminal():
        # the driver ended before it created the run (e.g. refused storage): say why
        message = _driver_error(JobsClient(row.address), row.submissions[-1]) or view.job_status
        registry.update_run(row.run_id, state=RunState.FAILED.value, ended=time.time(),
                            error=f"driver ended before the run started: {message}")
        view.row = registry.get_run(row.run_id)
    if record is not None:
        if driver_gone and not record.state.is_terminal():
            how = how or (f"Ray job {view.job_status.lower()}" if view.job_status else "driver process exited")
            if row.submitted and view.job_status == "FAILED":
                last = _last_line(JobsClient(row.address).info(row.submissions[-1]).message or "")
                how += f": {last}" if last else ""
            record.interrupted(f"interrupted: driver lost ({how})")
        registry.sync(record)
        view.row = registry.get_run(row.run_id)
    return view


def _silent(record: RunRecord | None, lost_after_s: float) -> tuple[bool, str | None]:
    """(gone, why) from a driver's heartbeat alone, for a run that is unfinished or already
    known lost (a resumed driver beats again at once); a record without one (an older driver)
    is never judged gone this way."""
    if record is None or record.heartbeat is None:
        return False, None
    if record.state.is_terminal() and not (record.state is RunState.FAILED and (record.error or "").startswith(LOST)):
        return False, None
    silent = time.time() - record.heartbeat
    if silent <= lost_after_s:
        return False, None
    return True, f"no heartbeat for {silent / 60:.0f} min"


LOST = "interrupted: driver lost"  # how refresh marks a run whose driver is gone


def recover_lost(registry: Registry, address: str | None = None, pipeline: str | None = None,
                 lost_after_s: float = LOST_AFTER_S, max_recoveries: int = 3,
                 say: Callable[[str], None] = print) -> list[str]:
    """Resume every run whose driver was lost (a head node that died, a killed driver), as a
    Ray job on ``address`` (default: the cluster it ran on); returns the run ids resumed.

    Nothing a person decided is undone: stopped runs, runs that failed on their own and
    finished runs are left alone, and a run is recovered at most ``max_recoveries`` times.
    A run whose cluster cannot be reached is left until its heartbeat is ``lost_after_s`` old.
    """
    from branchout.orchestrator.config.loader import SpecError

    resumed = []
    live = [RunState.PENDING.value, RunState.RUNNING.value, RunState.FAILED.value]
    candidates = [r for r in registry.list_runs(pipeline=pipeline, states=live, limit=1000)
                  if not RunState(r.state).is_terminal() or (r.error or "").startswith(LOST)]
    for row in candidates:
        view = refresh(registry, row, lost_after_s)
        record = view.record
        if record is None or record.state is not RunState.FAILED or not (record.error or "").startswith(LOST):
            continue
        if not view.driver_gone:  # its newest driver (a recovery already submitted) has not ended
            continue
        recoveries = sum(1 for sid in view.row.submissions if "-r" in sid) if view.row.submitted else 0
        target = address or view.row.address
        if recoveries >= max_recoveries:
            say(f"run {row.run_id}: driver lost, but it was recovered {recoveries} times already; "
                f"resume it yourself (branchout resume {row.run_id})")
            continue
        if not target:
            say(f"run {row.run_id}: driver lost on host {view.row.driver_host}; pass --address to resume it "
                "on a cluster")
            continue
        try:  # what the run recorded, not the pipeline file as it is now: nobody asked for a change
            sid = resume_submitted(registry, view.row, stored_spec(view.row), changed=False, address=target)
        except (OperateError, JobsError, SpecError, OSError) as e:
            say(f"run {row.run_id}: driver lost; not resumed: {e}")
            continue
        say(f"recovered run {row.run_id} {record.error.removeprefix(LOST).strip()}: resumed on {target} "
            f"as Ray job {sid}")
        resumed.append(row.run_id)
    return resumed


def stop_run(registry: Registry, row: RunRow, wait_s: float = 60) -> RunView:
    """Stop a running run's driver; the driver records ``stopped`` as it exits.

    Raises:
        OperateError: the run already ended, or its driver runs on another host.
    """
    view = refresh(registry, row)
    state = view.record.state if view.record else RunState(row.state)
    if state.is_terminal():
        raise OperateError(f"run {row.run_id} already {state.value}; nothing to stop")
    if row.submitted:
        client = JobsClient(row.address)
        client.stop(row.submissions[-1])
        _wait(lambda: client.status(row.submissions[-1]) in TERMINAL_JOB_STATES, wait_s)
    else:
        if row.driver_host != socket.gethostname():
            raise OperateError(f"run {row.run_id} is driven from host {row.driver_host}; stop it there")
        if row.driver_pid and _alive(row.driver_pid):
            os.kill(row.driver_pid, signal.SIGTERM)
            _wait(lambda: not _alive(row.driver_pid), wait_s)
    view = refresh(registry, registry.get_run(row.run_id))
    record = view.record
    if record is not None and not record.state.is_terminal():
        record.interrupted("stopped before it finished", RunState.STOPPED, "stopped by request")
        registry.sync(record)
    return refresh(registry, registry.get_run(row.run_id))


def check_resumable(registry: Registry, row: RunRow, force: bool):
    """The spec to resume with, after the checks; see ``branchout resume``.

    Raises:
        OperateError: finished, still running, unreadable, or its pipeline file changed.
    """
    from branchout.orchestrator.config.loader import load_spec
    from branchout.orchestrator.run.driver import spec_hash

    view = refresh(registry, row)
    if view.record is None:
        raise OperateError(f"run {row.run_id}: {view.note}")
    record = view.record
    if record.state is RunState.SUCCEEDED:
        raise OperateError(f"run {row.run_id} already succeeded; nothing to resume")
    if record.state in (RunState.RUNNING, RunState.PENDING):
        raise OperateError(f"run {row.run_id} is still {record.state.value}; stop it first (branchout stop {row.run_id})")
    source = source_of(row)
    stored = stored_spec(row)
    path = source.get("path")
    if not path or not os.path.exists(path):
        return stored, record  # nothing to compare with: resume what the run recorded
    current = load_spec(path, source.get("overrides") or [])
    if spec_hash(current) == record.spec_hash:
        return stored, record
    if not force:
        raise OperateError(
            f"{path} changed since run {row.run_id} started (spec {record.spec_hash[:12]} → "
            f"{spec_hash(current)[:12]}); pass --force to resume with the changed file "
            "(finished jobs are kept)")
    record.spec_hash = spec_hash(current)
    return current, record


def stored_spec(row: RunRow):
    """The spec the run recorded (``<run>/spec.yaml``: inputs as its driver read them)."""
    import yaml

    from branchout.orchestrator.config.loader import validate_spec

    return validate_spec(yaml.safe_load(storage.read_text(storage.join(row.run_uri, "spec.yaml"))),
                         f"{row.run_uri}/spec.yaml")


def resume_submitted(registry: Registry, row: RunRow, spec, changed: bool, address: str | None = None) -> str:
    """Submit a driver that continues ``row``'s run on its cluster (or on ``address``); returns
    the submission id."""
    from branchout.orchestrator.operate.inputs import ship_inputs
    from branchout.orchestrator.operate.jobs import driver_entrypoint, forwarded_env, job_metadata
    from branchout.orchestrator.run.driver import spec_hash

    submission_id = f"{row.run_id}-r{len(row.submissions)}"
    env = {"BRANCHOUT_SOURCE": row.source or "{}", **forwarded_env()}
    if changed:  # resumed with the edited file: the next `resume` compares the file with this
        env["BRANCHOUT_SPEC_HASH"] = spec_hash(spec)
    # inputs the first submit uploaded to shared storage are still there; inputs that
    # travelled in the job's own files must travel again, from the machine that resumes
    working_dir = None
    if _reads_job_files(spec):
        source = source_of(row)
        if not source.get("path") or not os.path.exists(source["path"]):
            raise OperateError(f"run {row.run_id} read its inputs from its job's files; resume it where "
                               f"{source.get('path') or 'its pipeline file'} and its data are, or use shared storage")
        from branchout.orchestrator.config.loader import load_spec

        shipment = ship_inputs(load_spec(source["path"], source.get("overrides") or []))
        spec, working_dir, changed = shipment.spec, shipment.working_dir, True
    if changed:
        env["BRANCHOUT_SPEC"] = spec.model_dump_json()
    address = address or row.address
    client = JobsClient(address)
    client.submit(submission_id, driver_entrypoint("--resume", row.run_uri), env,
                  job_metadata(row.pipeline, row.run_id), working_dir=working_dir)
    registry.register_submission(RunRecord.load(row.run_uri), address, submission_id, row.source)
    return submission_id


def _reads_job_files(spec) -> bool:
    from branchout.core.graph import corpora
    from branchout.orchestrator.operate.inputs import JOB_FILES

    paths = [*(c.dataset.path for c in corpora(spec.pretrain)), spec.tokenizer.path or "", spec.model.path or "",
             *(d.dataset.path for d in spec.finetune.domains)]
    return any(p.startswith(JOB_FILES + "/") for p in paths)


def _driver_error(client: JobsClient, submission_id: str) -> str:
    """The driver's own ``error:`` line from its job log (what it printed for the user), else
    the last line of Ray's message. Ray's message holds only the log's tail, which can end in
    shutdown noise rather than the reason."""
    try:
        errors = [x for x in client.logs(submission_id).splitlines() if x.startswith("error: ")]
    except JobsError:
        errors = []
    if errors:
        return errors[-1].removeprefix("error: ")
    return _last_line(client.info(submission_id).message or "")


def _last_line(text: str) -> str:
    lines = [x for x in str(text).strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a recycled pid belongs to some other program
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"branchout" in f.read()
    except OSError:
        return True


def _wait(done, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if done():
                return
        except JobsError:
            pass
        time.sleep(0.5)
