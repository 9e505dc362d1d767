"""Commands that operate on runs already started: status, list, logs, stop, resume, recover, lineage."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated

import typer

from branchout.orchestrator.cli.common import (
    EXIT_FAILED,
    RunArg,
    app,
    console,
    fail,
    find_run,
    open_registry,
    reported,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")]


def _row_json(row) -> dict:
    """A registry row for scripts; the pipeline's source text stays out (it can be long)."""
    from dataclasses import asdict

    return {k: v for k, v in asdict(row).items() if k != "source"}


def _print_json(value) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


@app.command()
def status(run: Annotated[str | None, typer.Argument(help="Run id or prefix; omit for active runs.")] = None,
           as_json: JsonOpt = False) -> None:
    """A run's stages and domain jobs: state, attempts, progress, times, models."""
    from branchout.orchestrator.operate.control import refresh
    from branchout.orchestrator.run.display import print_run_list, print_status

    with reported():
        if run is None:
            registry = open_registry()
            rows = [refresh(registry, r).row for r in registry.list_runs(states=["pending", "running"])]
            if as_json:
                _print_json([_row_json(r) for r in rows])
            else:
                print_run_list(console, rows, title="active runs")
            return
        row = find_run(run)
        view = refresh(open_registry(), row)
    if as_json:
        _print_json({"run": _row_json(view.row), "record": json.loads(view.record.to_json()) if view.record else None,
                     "ray_job_status": view.job_status, "note": view.note})
        return
    print_status(console, view)


@app.command(name="list")
def list_(
    pipeline: Annotated[str | None, typer.Option(help="Only runs of this pipeline.")] = None,
    state: Annotated[list[str] | None, typer.Option(help="Only runs in this state (repeatable).")] = None,
    limit: int = 50,
    as_json: JsonOpt = False,
) -> None:
    """Every run: state, timing, domains done, where its models are."""
    from branchout.orchestrator.run.display import print_run_list
    from branchout.orchestrator.run.state import RunState

    bad = [s for s in state or [] if s not in {x.value for x in RunState}]
    if bad:
        fail([f"--state {bad[0]!r}: expected one of {', '.join(x.value for x in RunState)}"])
    from branchout.orchestrator.operate.control import refresh

    registry = open_registry()
    rows = registry.list_runs(pipeline=pipeline, states=state, limit=limit)
    with reported():  # an active row may be stale (its driver died, or a submitted one never started)
        rows = [refresh(registry, r).row if not RunState(r.state).is_terminal() else r for r in rows]
    if as_json:
        _print_json([_row_json(r) for r in rows])
        return
    print_run_list(console, rows, registry=registry)


@app.command()
def logs(run: RunArg, follow: Annotated[bool, typer.Option("--follow", "-f")] = False) -> None:
    """The driver's log: Ray's job log for submitted runs, logs/driver.log for local ones."""
    from branchout import storage
    from branchout.orchestrator.operate.jobs import JobsClient
    from branchout.orchestrator.run.state import RunRecord

    row = find_run(run)
    with reported():
        if row.submitted:
            client = JobsClient(row.address)
            if follow:
                for chunk in client.follow(row.submissions[-1]):
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
            else:
                sys.stdout.write(client.logs(row.submissions[-1]))
            return
        uri = storage.join(row.run_uri, "logs", "driver.log")
        offset = 0
        while True:
            text = storage.read_text(uri) if storage.exists(uri) else ""
            sys.stdout.write(text[offset:])
            sys.stdout.flush()
            offset = len(text)
            if not follow or RunRecord.load(row.run_uri).state.is_terminal():
                return
            time.sleep(1)


@app.command()
def stop(run: RunArg) -> None:
    """Stop a running run (its driver records `stopped`); resume it later."""
    from branchout.orchestrator.operate.control import stop_run

    row = find_run(run)
    with reported():
        view = stop_run(open_registry(), row)
    console.print(f"run {row.run_id}: {view.row.state}")


@app.command()
def resume(run: RunArg, force: Annotated[bool, typer.Option(help="Resume even though the pipeline file changed.")] = False) -> None:
    """Continue a failed or stopped run: finished jobs are kept, the rest resume from checkpoints."""
    from branchout.orchestrator.operate.control import check_resumable, resume_submitted
    from branchout.orchestrator.run.driver import run_pipeline
    from branchout.orchestrator.run.state import RunState

    registry = open_registry()
    row = find_run(run)
    with reported():
        spec, record = check_resumable(registry, row, force)
        if row.submitted:
            sid = resume_submitted(registry, row, spec, changed=force)
            console.print(f"resuming run {row.run_id} on {row.address} (Ray job {sid}); "
                          f"follow: branchout logs {row.run_id} --follow")
            return
        record = run_pipeline(spec, console, record=record, source=row.source)
    raise typer.Exit(0 if record.state is RunState.SUCCEEDED else EXIT_FAILED)


@app.command()
def recover(
    address: Annotated[str | None, typer.Option(help="Resume lost runs on this cluster (default: RAY_ADDRESS, "
                                                     "else the cluster each ran on).")] = None,
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline's runs.")] = None,
    watch: Annotated[float | None, typer.Option(help="Keep watching: look again every WATCH seconds.")] = None,
    lost_after: Annotated[float, typer.Option(help="A driver out of reach is lost after this many seconds "
                                                   "without a heartbeat.")] = 600.0,
    max_recoveries: Annotated[int, typer.Option(help="Resume a run at most this many times.")] = 3,
) -> None:
    """Resume every run whose driver was lost (its head node died, its driver was killed), unattended.

    A driver is lost when its Ray job ended while the run was unfinished, when its cluster
    answers but no longer knows the job (a restarted head), or when it cannot be reached and
    its heartbeat is older than --lost-after. Stopped, finished and genuinely failed runs are
    left alone. Run it on a schedule (deploy/kuberay/recover-cronjob.yaml) or with --watch.
    """
    import signal

    from branchout.orchestrator.operate.control import recover_lost
    from branchout.orchestrator.operate.jobs import JobsError, resolve_address

    if watch is not None and watch <= 0:
        fail(["--watch: must be a number of seconds > 0"])
    if lost_after <= 0 or max_recoveries < 1:
        fail(["--lost-after must be > 0 and --max-recoveries ≥ 1"])
    try:
        target = resolve_address(address)
    except JobsError as e:
        if address:
            fail([f"--address: {e}"])
        target = None  # each run goes back to the cluster it ran on
    registry = open_registry()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    said: set[str] = set()

    def say(line: str) -> None:  # a watcher says a thing once, not at every pass
        if line not in said:  # plain lines: a watcher's output is a log, never wrapped
            said.add(line)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    while True:
        try:
            recover_lost(registry, target, pipeline, lost_after, max_recoveries, say=say)
        except Exception as e:  # a watcher outlives a registry or cluster hiccup; a one-shot says it and fails
            from branchout.orchestrator.run.fanout import describe_error

            say(f"error: recover: {describe_error(e)}")
            if watch is None:
                raise typer.Exit(EXIT_FAILED) from None
        if watch is None or stopping:
            return
        deadline = time.time() + watch
        while time.time() < deadline and not stopping:
            time.sleep(min(0.5, watch))
        if stopping:
            return


@app.command()
def lineage(what: Annotated[str, typer.Argument(help="A run id (or prefix), or a model directory/URI.")]) -> None:
    """Data fingerprints → tokenizer → pretrain → fine-tunes → evaluation, computed or cached."""
    from branchout.orchestrator.operate.registry import RegistryError
    from branchout.orchestrator.run.lineage import find_job, lineage_tree
    from branchout.orchestrator.run.state import RunRecord

    registry = open_registry()
    focus = None
    try:
        row = registry.get_run(what)
    except RegistryError:
        path = os.path.abspath(what) if "://" not in what else what
        rows = [r for r in registry.list_runs(limit=100000)
                if path.startswith(r.run_uri.removeprefix("file://").rstrip("/") + "/")]
        if not rows:
            fail([f"{what}: neither a run id nor a model directory of a known run (see `branchout list`)"])
        row = rows[0]
        focus = find_job(RunRecord.load(row.run_uri), path)
    try:
        record = RunRecord.load(row.run_uri)
    except (OSError, ValueError) as e:
        fail([f"run {row.run_id}: cannot read {row.run_uri}/state.json ({e})"])
    console.print(lineage_tree(record, focus))
