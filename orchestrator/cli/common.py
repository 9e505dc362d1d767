"""What every ``branchout`` command shares: the Typer app, consoles, argument types,
and the one place where user errors become one line and exit code 2."""


from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from branchout.orchestrator.run.display import untrusted

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Pre-train once with DeepSpeed on Ray, fine-tune per domain, evaluate.")
# Off a terminal (CI, job logs) rich would wrap at 80 columns; log lines read better long.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 300)

EXIT_USAGE = 2
EXIT_FAILED = 1

PipelineArg = Annotated[Path, typer.Argument(help="The pipeline YAML file.", show_default=False)]
RunArg = Annotated[str, typer.Argument(help="Run id or a unique prefix of it.", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a field: key.path=value (repeatable).")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Compute every job, reusing nothing from earlier runs.")]
RerunOpt = Annotated[list[str] | None, typer.Option("--rerun", help="Recompute this job, stage or domain and what depends on it (repeatable).")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray Jobs API, e.g. http://HEAD:8265 "
                                                "(default: RAY_API_SERVER_ADDRESS / RAY_ADDRESS).")]


def fail(lines: list[str], code: int = EXIT_USAGE) -> None:
    for line in lines:
        err.print(f"[bold red]error:[/] {untrusted(line)}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"branchout {version('branchout')}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """Pre-train once with DeepSpeed on Ray, fine-tune per domain, evaluate."""


def load_checked(pipeline: Path, overrides: list[str] | None):
    """Spec validation and data preflight; exits 2 with every problem listed."""
    from branchout.orchestrator.config.loader import SpecError, load_spec
    from branchout.orchestrator.config.preflight import preflight

    try:
        spec = load_spec(pipeline, overrides)
    except SpecError as e:
        fail([f"{e.source}: {p}" for p in e.problems])
    problems, notes = preflight(spec)
    for note in notes:
        err.print(f"note: {note}", highlight=False)
    if problems:
        fail([f"{pipeline}: {p}" for p in problems])
    return spec


def pipeline_source(pipeline: Path, overrides: list[str] | None) -> dict:
    return {"path": str(pipeline.resolve()), "overrides": list(overrides or [])}


def open_registry():
    from branchout.orchestrator.operate.registry import Registry, RegistryConfigError

    try:
        return Registry()
    except RegistryConfigError as e:
        fail([str(e)])


def find_run(run: str):
    from branchout.orchestrator.operate.registry import RegistryError

    try:
        return open_registry().get_run(run)
    except RegistryError as e:
        fail([str(e)])


def user_errors():
    """Exception types that are the user's to fix: one line, exit 2."""
    from branchout.cluster.connect import ClusterError
    from branchout.orchestrator.config.loader import SpecError
    from branchout.orchestrator.operate.control import OperateError
    from branchout.orchestrator.operate.inputs import ShippingError
    from branchout.orchestrator.operate.jobs import JobsError
    from branchout.orchestrator.operate.migrations import RegistrySchemaError
    from branchout.orchestrator.operate.registry import RegistryConfigError
    from branchout.orchestrator.operate.scheduler import ScheduleError
    from branchout.stages.prepare.data import DataError
    from branchout.stages.training.export import ExportError
    from branchout.storage import StorageError

    return (ClusterError, JobsError, OperateError, StorageError, SpecError, DataError, RegistrySchemaError,
            ShippingError, ScheduleError, ExportError, RegistryConfigError)


def check_rerun(spec, rerun: list[str] | None) -> None:
    from branchout.core.graph import build_graph

    try:
        build_graph(spec).select(rerun or [])
    except ValueError as e:
        fail([str(e)])


@contextmanager
def reported() -> Iterator[None]:
    """A user's mistake raised inside (bad file, unreachable cluster or storage, unknown run):
    one line on stderr and exit 2, never a traceback. Every command shares it."""
    try:
        yield
    except user_errors() as e:
        fail([str(e)])
