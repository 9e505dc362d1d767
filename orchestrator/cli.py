"""The ``branchout`` command line.

User mistakes (a bad pipeline file, unreadable data, an unreachable cluster, an unknown
run id) print one line per problem to stderr and exit with code 2, before any worker
starts. A run exits 0 only when every stage and every domain job succeeded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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
        err.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True, markup=True)
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


def _source(pipeline: Path, overrides: list[str] | None) -> dict:
    return {"path": str(pipeline.resolve()), "overrides": list(overrides or [])}


def _registry():
    from branchout.orchestrator.registry import Registry

    return Registry()


def _find(run: str):
    from branchout.orchestrator.registry import RegistryError

    try:
        return _registry().get_run(run)
    except RegistryError as e:
        fail([str(e)])


def _user_errors():
    """Exception types that are the user's to fix: one line, exit 2."""
    from branchout.cluster.connect import ClusterError
    from branchout.orchestrator.inputs import ShippingError
    from branchout.orchestrator.jobs import JobsError
    from branchout.orchestrator.loader import SpecError
    from branchout.orchestrator.migrations import RegistrySchemaError
    from branchout.orchestrator.operate import OperateError
    from branchout.stages.data import DataError
    from branchout.stages.storage import StorageError

    return (ClusterError, JobsError, OperateError, StorageError, SpecError, DataError, RegistrySchemaError,
            ShippingError)


@app.command()
def validate(pipeline: PipelineArg, set_: SetOpt = None) -> None:
    """Check a pipeline file and its data, and print the plan. Starts no Ray."""
    from branchout.orchestrator.display import print_plan
    from branchout.orchestrator.plan import build_plan

    spec = load_checked(pipeline, set_)
    print_plan(console, build_plan(spec), spec.notes)
    console.print(f"[green]{pipeline} is valid[/]")


@app.command()
def plan(
    pipeline: PipelineArg,
    set_: SetOpt = None,
    gpu: Annotated[str | None, typer.Option(help="GPU type, e.g. H100-80GB, A100-40GB, L4-24GB.")] = None,
    gpu_mem: Annotated[float | None, typer.Option(help="Memory of one GPU in GiB (instead of --gpu).")] = None,
) -> None:
    """Per-GPU memory under ZeRO 0-3 with and without offload, and the cheapest setting that fits."""
    from branchout.cluster.memory import GiB, gpu_memory_gb
    from branchout.orchestrator.display import print_memory_plan
    from branchout.orchestrator.loader import SpecError, load_spec
    from branchout.orchestrator.plan import model_shape

    try:
        spec = load_spec(pipeline, set_)
        memory = gpu_mem * GiB / 1e9 if gpu_mem else (gpu_memory_gb(gpu) if gpu else None)
    except SpecError as e:
        fail([f"{e.source}: {p}" for p in e.problems])
    except ValueError as e:
        fail([str(e)])
    print_memory_plan(console, spec, model_shape(spec), memory, gpu or (f"{gpu_mem:g} GiB" if gpu_mem else None))


def _check_rerun(spec, rerun: list[str] | None) -> None:
    from branchout.orchestrator.cache import expand_rerun

    try:
        expand_rerun(spec, rerun or [])
    except ValueError as e:
        fail([str(e)])


@app.command()
def run(pipeline: PipelineArg, set_: SetOpt = None, no_cache: NoCacheOpt = False, rerun: RerunOpt = None,
        run_id: Annotated[str | None, typer.Option(hidden=True, help="Use this run id (the scheduler's).")] = None) -> None:
    """Run a pipeline here (embedded local Ray unless cluster.address is set)."""
    from branchout.orchestrator.driver import run_pipeline
    from branchout.orchestrator.state import RunState

    spec = load_checked(pipeline, set_)
    _check_rerun(spec, rerun)
    try:
        record = run_pipeline(spec, console, source=json.dumps(_source(pipeline, set_)),
                              use_cache=not no_cache, rerun=rerun, run_id=run_id)
    except _user_errors() as e:
        fail([str(e)])
    raise typer.Exit(0 if record.state is RunState.SUCCEEDED else EXIT_FAILED)


@app.command()
def submit(
    pipeline: PipelineArg,
    set_: SetOpt = None,
    address: AddressOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the logs until the run ends.")] = False,
    working_dir: Annotated[str | None, typer.Option(help="Directory to ship with the job (runtime_env).")] = None,
    pip: Annotated[list[str] | None, typer.Option(help="pip requirement to install for the job (repeatable).")] = None,
    no_cache: NoCacheOpt = False,
    rerun: RerunOpt = None,
) -> None:
    """Validate here, then run the pipeline's driver on a Ray cluster as a Ray job."""
    from branchout.orchestrator.jobs import resolve_address
    from branchout.orchestrator.operate import submit_pipeline

    spec = load_checked(pipeline, set_)
    _check_rerun(spec, rerun)
    try:
        address = resolve_address(address, spec.cluster.address)
        record = submit_pipeline(spec, _source(pipeline, set_), address, _registry(), working_dir, pip,
                                 {"use_cache": not no_cache, "rerun": rerun or []},
                                 say=lambda line: console.print(line, highlight=False))
    except _user_errors() as e:
        fail([str(e)])
    console.print(f"submitted run [bold]{record.run_id}[/] to {address} (Ray job {record.run_id})")
    console.print(f"  follow:  branchout logs {record.run_id} --follow")
    console.print(f"  status:  branchout status {record.run_id}")
    console.print(f"  outputs: {record.run_uri}")
    if wait:
        from branchout.orchestrator.operate import refresh

        logs(record.run_id, follow=True)
        view = refresh(_registry(), _find(record.run_id))
        console.print(f"run {record.run_id}: {view.row.state}")
        raise typer.Exit(0 if view.row.state == "succeeded" else EXIT_FAILED)


@app.command()
def status(run: Annotated[str | None, typer.Argument(help="Run id or prefix; omit for active runs.")] = None) -> None:
    """A run's stages and domain jobs: state, attempts, progress, times, models."""
    from branchout.orchestrator.display import print_run_list, print_status
    from branchout.orchestrator.operate import refresh

    try:
        if run is None:
            registry = _registry()
            rows = registry.list_runs(states=["pending", "running"])
            print_run_list(console, [refresh(registry, r).row for r in rows], title="active runs")
            return
        row = _find(run)
        view = refresh(_registry(), row)
    except _user_errors() as e:
        fail([str(e)])
    print_status(console, view)


@app.command(name="list")
def list_(
    pipeline: Annotated[str | None, typer.Option(help="Only runs of this pipeline.")] = None,
    state: Annotated[list[str] | None, typer.Option(help="Only runs in this state (repeatable).")] = None,
    limit: int = 50,
) -> None:
    """Every run: state, timing, domains done, where its models are."""
    from branchout.orchestrator.display import print_run_list
    from branchout.orchestrator.state import RunState

    bad = [s for s in state or [] if s not in {x.value for x in RunState}]
    if bad:
        fail([f"--state {bad[0]!r}: expected one of {', '.join(x.value for x in RunState)}"])
    from branchout.orchestrator.operate import refresh

    registry = _registry()
    rows = registry.list_runs(pipeline=pipeline, states=state, limit=limit)
    try:  # an active row may be stale (its driver died, or a submitted one never started)
        rows = [refresh(registry, r).row if not RunState(r.state).is_terminal() else r for r in rows]
    except _user_errors() as e:
        fail([str(e)])
    print_run_list(console, rows, registry=registry)


@app.command()
def logs(run: RunArg, follow: Annotated[bool, typer.Option("--follow", "-f")] = False) -> None:
    """The driver's log: Ray's job log for submitted runs, logs/driver.log for local ones."""
    from branchout.orchestrator.jobs import JobsClient
    from branchout.orchestrator.state import RunRecord
    from branchout.stages import storage

    row = _find(run)
    try:
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
    except _user_errors() as e:
        fail([str(e)])


@app.command()
def stop(run: RunArg) -> None:
    """Stop a running run (its driver records `stopped`); resume it later."""
    from branchout.orchestrator.operate import stop_run

    row = _find(run)
    try:
        view = stop_run(_registry(), row)
    except _user_errors() as e:
        fail([str(e)])
    console.print(f"run {row.run_id}: {view.row.state}")


@app.command()
def resume(run: RunArg, force: Annotated[bool, typer.Option(help="Resume even though the pipeline file changed.")] = False) -> None:
    """Continue a failed or stopped run: finished jobs are kept, the rest resume from checkpoints."""
    from branchout.orchestrator.driver import run_pipeline
    from branchout.orchestrator.operate import check_resumable, resume_submitted
    from branchout.orchestrator.state import RunState

    registry = _registry()
    row = _find(run)
    try:
        spec, record = check_resumable(registry, row, force)
        if row.submitted:
            sid = resume_submitted(registry, row, spec, changed=force)
            console.print(f"resuming run {row.run_id} on {row.address} (Ray job {sid}); "
                          f"follow: branchout logs {row.run_id} --follow")
            return
        record = run_pipeline(spec, console, record=record, source=row.source)
    except _user_errors() as e:
        fail([str(e)])
    raise typer.Exit(0 if record.state is RunState.SUCCEEDED else EXIT_FAILED)


@app.command()
def lineage(what: Annotated[str, typer.Argument(help="A run id (or prefix), or a model directory/URI.")]) -> None:
    """Data fingerprints → tokenizer → pretrain → fine-tunes → evaluation, computed or cached."""
    from branchout.orchestrator.lineage import find_job, lineage_tree
    from branchout.orchestrator.registry import RegistryError
    from branchout.orchestrator.state import RunRecord

    registry = _registry()
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


@app.command(hidden=True)
def driver(
    run_id: Annotated[str | None, typer.Option(help="Start this new run (spec in BRANCHOUT_SPEC).")] = None,
    resume_uri: Annotated[str | None, typer.Option("--resume", help="Continue the run stored here.")] = None,
) -> None:
    """The pipeline driver of a submitted Ray job (what `branchout submit` runs on the cluster)."""
    import yaml

    from branchout.orchestrator.driver import run_pipeline
    from branchout.orchestrator.loader import validate_spec
    from branchout.orchestrator.spec import PipelineSpec
    from branchout.orchestrator.state import RunRecord, RunState
    from branchout.stages import storage

    source = os.environ.get("BRANCHOUT_SOURCE")
    raw_spec = os.environ.get("BRANCHOUT_SPEC")
    options = json.loads(os.environ.get("BRANCHOUT_RUN_OPTIONS") or "{}")
    try:
        if resume_uri:
            record = RunRecord.load(resume_uri)
            spec = (PipelineSpec.model_validate_json(raw_spec) if raw_spec else validate_spec(
                yaml.safe_load(storage.read_text(storage.join(resume_uri, "spec.yaml"))), resume_uri))
            result = run_pipeline(spec, console, record=record, source=source)
        else:
            if not (run_id and raw_spec):
                fail(["driver: needs --run-id and BRANCHOUT_SPEC, or --resume RUN_URI"])
            spec = PipelineSpec.model_validate_json(raw_spec)
            result = run_pipeline(spec, console, source=source, run_id=run_id, **options)
    except _user_errors() as e:
        fail([str(e)])
    raise typer.Exit(0 if result.state is RunState.SUCCEEDED else EXIT_FAILED)


@app.command()
def export(
    run: RunArg,
    domain: Annotated[str, typer.Option(help="The domain whose fine-tune to export.", show_default=False)],
    out: Annotated[Path, typer.Option(help="A new directory to write.", show_default=False)],
    merge: Annotated[bool, typer.Option(help="LoRA: merge the adapter into the base (one standalone model).")] = False,
    dtype: Annotated[str | None, typer.Option(help="Cast the weights: bf16, fp16 or fp32.")] = None,
) -> None:
    """Write a domain's fine-tune as a standalone HF model, or base + adapters for multi-LoRA servers."""
    from branchout.orchestrator.state import RunRecord
    from branchout.stages.export import ExportError, export_finetune

    row = _find(run)
    try:
        record = RunRecord.load(row.run_uri)
    except (OSError, ValueError) as e:
        fail([f"run {row.run_id}: cannot read {row.run_uri}/state.json ({e})"])
    domains = sorted(record.jobs("finetune"))
    job = record.jobs("finetune").get(domain)
    if job is None:
        fail([f"--domain {domain!r}: run {row.run_id} has no such domain (domains: {', '.join(domains)})"])
    if not job.state.done:
        fail([f"--domain {domain}: its fine-tune is {job.state.value}, there is no model to export"])
    method = "lora" if job.outputs.get("parent") and _is_adapter(job.outputs["model_uri"]) else "full"
    try:
        written = export_finetune(job.outputs["model_uri"], job.outputs.get("parent"), method, domain, str(out),
                                  merge=merge, dtype=dtype)
    except ExportError as e:
        fail([str(e)])
    for path in written:
        console.print(f"wrote {path}")


def _is_adapter(model_uri: str) -> bool:
    from branchout.stages import storage

    return storage.exists(storage.join(model_uri, "adapter_config.json"))


@app.command()
def schema() -> None:
    """Print the pipeline file's JSON Schema (for editors: see docs/pipeline.schema.json)."""
    from branchout.orchestrator.schema import render

    sys.stdout.write(render())


@app.command(hidden=True)
def probe(storage_uri: str, nonce: str) -> None:
    """Run on the cluster by `branchout submit`: can this node use the storage as the client does?"""
    from branchout.stages import storage

    try:
        storage.check_reachable(storage_uri)
        marker = storage.join(storage_uri, ".probes", nonce)
        seen = storage.read_text(marker) if storage.exists(marker) else None
    except (storage.StorageError, OSError) as e:
        fail([str(e).splitlines()[0]])
    if seen != nonce:
        fail([f"this node does not see what the submitting machine wrote to {storage_uri}: the storage is "
              "not shared with the cluster (use s3://…, gs://…, or a file:/// mount every node has)"])
    console.print(f"storage {storage_uri}: readable and writable from this node")


# The schedule commands live in their own module; importing it registers them on `app`.
from branchout.orchestrator import cli_schedule  # noqa: E402, F401


def main() -> None:
    app()
