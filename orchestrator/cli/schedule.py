"""``branchout schedule …`` and ``branchout scheduler``: retraining on cron times and data changes."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from branchout.core.graph import corpora
from branchout.orchestrator.cli.common import (
    AddressOpt,
    PipelineArg,
    SetOpt,
    app,
    console,
    fail,
    load_checked,
    open_registry,
    reported,
    untrusted,
)

schedule_app = typer.Typer(no_args_is_help=True, help="Retrain on a schedule or when data changes.")
app.add_typer(schedule_app, name="schedule")


def _store():
    from branchout.orchestrator.operate.scheduler import ScheduleStore

    return ScheduleStore(open_registry())


@schedule_app.command("add")
def schedule_add(
    pipeline: PipelineArg,
    cron: Annotated[str | None, typer.Option(help='Cron expression, e.g. "0 3 * * 1" (Mondays 03:00).')] = None,
    timezone: Annotated[str, typer.Option(help="Time zone of the cron times, e.g. Europe/Berlin.")] = "UTC",
    on_data_change: Annotated[bool, typer.Option("--on-data-change", help="Also run when a dataset changes.")] = False,
    watch: Annotated[list[str] | None, typer.Option(
        help="Only this dataset's changes fire (pretrain or a domain name; repeatable; implies --on-data-change)."
    )] = None,
    poll: Annotated[float, typer.Option(help="Seconds between data-change checks.")] = 300.0,
    address: AddressOpt = None,
    overlap: Annotated[str, typer.Option(help="skip | queue: a fire while a run is active.")] = "skip",
    missed: Annotated[str, typer.Option(help="run-once | skip: fire times missed while no scheduler ran.")] = "run-once",
    set_: SetOpt = None,
) -> None:
    """Add a schedule (kept in the registry; `branchout scheduler` fires it)."""
    spec = load_checked(pipeline, set_)
    sources = [c.key for c in corpora(spec.pretrain) if c.key != "pretrain"]
    names = ["pretrain", *(d.name for d in spec.finetune.domains), *sources]
    unknown = [w for w in watch or [] if w not in names]
    if unknown:
        fail([f"--watch {', '.join(unknown)}: not a dataset of {pipeline} (pretrain or a domain: {', '.join(names[1:])})"])
    with reported():
        schedule_id = _store().add(str(pipeline), cron, timezone, on_data_change, poll, address, overlap, missed,
                                   list(set_ or []), watch=list(watch or []) or None)
    s = _store().get(schedule_id)
    nxt = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(s.next_fire)) if s.next_fire else "-"
    console.print(f"schedule {schedule_id}: {untrusted(str(pipeline))} cron={untrusted(cron or '-')} ({timezone}) "
                  f"data-change={', '.join(s.watch) if s.watch else 'any dataset' if s.on_data_change else 'no'}; "
                  f"next cron fire {nxt}")


@schedule_app.command("list")
def schedule_list() -> None:
    """Every schedule: its triggers, policies, next and last fire."""
    from rich.table import Table

    table = Table(title="schedules", title_justify="left")
    for col in ("id", "pipeline", "cron", "tz", "data change", "overlap", "missed", "next fire", "last fire", "last run"):
        table.add_column(col, overflow="fold")
    fmt = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"  # noqa: E731
    for s in _store().all():
        table.add_row(str(s.id), untrusted(s.pipeline), s.cron or "-", s.timezone, (f"{', '.join(s.watch) if s.watch else 'any'}, every {s.poll_s:g}s"
                      if s.on_data_change else "-"),
                      s.overlap + (" (queued)" if s.queued else ""), s.missed, fmt(s.next_fire), fmt(s.last_fire),
                      s.last_run or "-")
    console.print(table)


@schedule_app.command("remove")
def schedule_remove(schedule_id: int) -> None:
    """Delete a schedule."""
    with reported():
        _store().remove(schedule_id)
    console.print(f"schedule {schedule_id} removed")


@schedule_app.command("run-now")
def schedule_run_now(schedule_id: int) -> None:
    """Fire a schedule now (its overlap policy still applies)."""
    from branchout.orchestrator.operate.scheduler import Scheduler, launch

    scheduler = Scheduler(open_registry(), launch, log=console.print)
    with reported():
        s = scheduler.store.get(schedule_id)
    scheduler._fire(s, "run-now", time.time())


@app.command()
def scheduler(interval: Annotated[float, typer.Option(help="Seconds between ticks.")] = 30.0) -> None:
    """Fire schedules until SIGTERM/Ctrl-C: cron times, data changes; decisions go to the registry."""
    import signal

    from branchout.orchestrator.operate.scheduler import Scheduler, launch
    from branchout.orchestrator.operate.secrets import mask

    stopping: list[int] = []

    def stop(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service = Scheduler(open_registry(), launch, log=lambda m: console.print(f"{time.strftime('%H:%M:%S')} {untrusted(m)}", highlight=False))
    count = len(service.store.all())
    console.print(f"{time.strftime('%H:%M:%S')} scheduler: {count} schedule(s), tick every {interval:g}s, "
                  f"registry {mask(service.registry.url)}", highlight=False)
    service.serve(interval, lambda: bool(stopping))
    console.print(f"{time.strftime('%H:%M:%S')} scheduler stopped ({signal.Signals(stopping[0]).name})", highlight=False)


