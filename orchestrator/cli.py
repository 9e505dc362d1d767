"""The ``branchout`` command line.

User mistakes (a bad pipeline file, unreadable data, an unreachable cluster) print one
line per problem to stderr and exit with code 2, before any worker starts. A run exits
0 only when every stage and every domain job succeeded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Pre-train once with DeepSpeed on Ray, fine-tune per domain, evaluate.")
# Off a terminal (CI, job logs) rich would wrap at 80 columns; log lines read better long.
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

EXIT_USAGE = 2
EXIT_FAILED = 1

PipelineArg = Annotated[Path, typer.Argument(help="The pipeline YAML file.", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a field: key.path=value (repeatable).")]


def fail(lines: list[str], code: int = EXIT_USAGE) -> None:
    for line in lines:
        err.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load_checked(pipeline: Path, overrides: list[str] | None):
    """Spec validation and data preflight; exits 2 with every problem listed."""
    from branchout.orchestrator.loader import SpecError, load_spec
    from branchout.orchestrator.preflight import preflight

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


@app.command()
def validate(pipeline: PipelineArg, set_: SetOpt = None) -> None:
    """Check a pipeline file and its data, and print the plan. Starts no Ray."""
    from branchout.orchestrator.display import print_plan
    from branchout.orchestrator.plan import build_plan

    spec = load_checked(pipeline, set_)
    print_plan(console, build_plan(spec))
    console.print(f"[green]{pipeline} is valid[/]")


@app.command()
def run(pipeline: PipelineArg, set_: SetOpt = None) -> None:
    """Run a pipeline end to end (embedded local Ray unless cluster.address is set)."""
    from branchout.cluster.connect import ClusterError
    from branchout.orchestrator.driver import run_pipeline
    from branchout.orchestrator.state import RunState

    spec = load_checked(pipeline, set_)
    try:
        record = run_pipeline(spec, console)
    except ClusterError as e:
        fail([str(e)])
    raise typer.Exit(0 if record.state is RunState.SUCCEEDED else EXIT_FAILED)


def main() -> None:
    # `--set` is a Python keyword-ish name; typer maps the option to `set_`.
    sys.exit(app())
