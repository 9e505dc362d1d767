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
from branchout.orchestrator.operate.jobs import TERMINAL_JOB_STATES, JobsClient, JobsError
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
           "BRANCHOUT_RUN_OPTIONS": json.dumps(options or {}), **forwarded_env()}
    client.submit(run_id, driver_entrypoint("--run-id", run_id), env, job_metadata(spec.name, run_id),
                  working_dir=shipment.working_dir or working_dir, pip=pip)
    registry.register_submission(record, address, run_id, json.dumps(source))
    return record


def refresh(registry: Registry, row: RunRow) -> RunView:
    """Read the run's state.json and its driver's liveness; mark it interrupted if the driver is gone."""
    view = RunView(row=row, record=None)
    try:
        view.record = RunRecord.load(row.run_uri)
    except (OSError, ValueError, KeyError) as e:
        view.note = f"cannot read {row.run_uri}/state.json from here ({type(e).__name__})"
    driver_gone = False
    if row.submitted and row.submissions:
        try:
            view.job_status = JobsClient(row.address).status(row.submissions[-1])
            driver_gone = view.job_status in TERMINAL_JOB_STATES
        except JobsError as e:
            view.note = str(e)
    elif row.driver_host == socket.gethostname() and row.driver_pid:
        driver_gone = not _alive(row.driver_pid)
    record = view.record
    if record is None and driver_gone and not RunState(row.state).is_terminal():
        # the driver ended before it created the run (e.g. refused storage): say why
        message = _driver_error(JobsClient(row.address), row.submissions[-1]) or view.job_status
        registry.update_run(row.run_id, state=RunState.FAILED.value, ended=time.time(),
                            error=f"driver ended before the run started: {message}")
        view.row = registry.get_run(row.run_id)
    if record is not None:
        if driver_gone and not record.state.is_terminal():
            how = f"Ray job {view.job_status.lower()}" if view.job_status else "driver process exited"
            if row.submitted and view.job_status == "FAILED":
                last = _last_line(JobsClient(row.address).info(row.submissions[-1]).message or "")
                how += f": {last}" if last else ""
            record.interrupted(f"interrupted: driver lost ({how})")
        registry.sync(record)
        view.row = registry.get_run(row.run_id)
    return view


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
    import yaml

    from branchout.orchestrator.config.loader import load_spec, validate_spec
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
    stored = validate_spec(yaml.safe_load(storage.read_text(storage.join(row.run_uri, "spec.yaml"))),
                           f"{row.run_uri}/spec.yaml")
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


def resume_submitted(registry: Registry, row: RunRow, spec, changed: bool) -> str:
    """Submit a driver that continues ``row``'s run on its cluster; returns the submission id."""
    from branchout.orchestrator.operate.inputs import ship_inputs
    from branchout.orchestrator.operate.jobs import driver_entrypoint, forwarded_env, job_metadata

    submission_id = f"{row.run_id}-r{len(row.submissions)}"
    env = {"BRANCHOUT_SOURCE": row.source or "{}", **forwarded_env()}
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
    client = JobsClient(row.address)
    client.submit(submission_id, driver_entrypoint("--resume", row.run_uri), env,
                  job_metadata(row.pipeline, row.run_id), working_dir=working_dir)
    registry.register_submission(RunRecord.load(row.run_uri), row.address, submission_id, row.source)
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
