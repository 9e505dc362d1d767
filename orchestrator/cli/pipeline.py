"""Commands that take a pipeline file: validate, plan, run, submit, and the driver a
submitted run starts on the cluster; export and schema."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from branchout.orchestrator.cli.common import (
    EXIT_FAILED,
    AddressOpt,
    NoCacheOpt,
    PipelineArg,
    RerunOpt,
    RunArg,
    SetOpt,
    app,
    check_rerun,
    console,
    fail,
    find_run,
    load_checked,
    open_registry,
    pipeline_source,
    reported,
)


@app.command()
def validate(pipeline: PipelineArg, set_: SetOpt = None) -> None:
    """Check a pipeline file and its data, and print the plan. Starts no Ray."""
    from branchout.orchestrator.config.plan import build_plan
    from branchout.orchestrator.run.display import print_plan

    spec = load_checked(pipeline, set_)
    print_plan(console, build_plan(spec), spec.notes)
    console.print(f"[green]{pipeline} is valid[/]")


def memory_plan_json(spec, shape, memory: float | None, gpu: str | None, step_s: float | None) -> dict:
    """``plan --json``: the model, and per distributed job every ZeRO option's bytes per GPU and
    the pick; with ``--step-s`` the predicted multi-GPU steps (marked as predictions)."""
    from dataclasses import asdict

    from branchout.cluster.gpu_memory import pick
    from branchout.cluster.interconnect import predict_step
    from branchout.core.graph import Kind, build_graph
    from branchout.orchestrator.config.plan import _gpu_memory, memory_options

    jobs = []
    for n in build_graph(spec).of(Kind.PRETRAIN, Kind.FINETUNE):
        if n.kind is not Kind.PRETRAIN and n.workers <= 1:
            continue
        budget = memory or _gpu_memory(n.section)
        options = memory_options(shape, n.section, n.seq_len, budget) if budget else []
        best = pick(options)
        jobs.append({"job": n.name, "workers": n.section.num_workers, "gpu_memory_gb": budget,
                     "options": [{"setting": e.option.label, "model_states_bytes": e.model_states,
                                  "activations_bytes": e.activations, "total_bytes": e.total,
                                  "usable_bytes": e.budget, "host_bytes_per_node": e.cpu_per_node, "fits": e.fits}
                                 for e in options],
                     "pick": best.option.label if best else None})
    out = {"pipeline": spec.name, "model": asdict(shape), "jobs": jobs}
    accelerator = gpu or spec.pretrain.resources_per_worker.accelerator
    if step_s is not None and accelerator:
        width = 2 if spec.pretrain.deepspeed.precision in ("auto", "bf16", "fp16") else 4
        out["step_prediction"] = {"predicted": True, "measured_single_gpu_step_s": step_s, "gpu": accelerator,
                                  "rows": [{"stage": stage, **asdict(p)} for n in (2, 8, 16, 64) for stage in (2, 3)
                                           if (p := predict_step(step_s, stage, shape.params, width, n, 8, accelerator))]}
    return out


@app.command()
def plan(
    pipeline: PipelineArg,
    set_: SetOpt = None,
    gpu: Annotated[str | None, typer.Option(help="GPU type, e.g. H100-80GB, A100-40GB, L4-24GB.")] = None,
    gpu_mem: Annotated[float | None, typer.Option(help="Memory of one GPU in GiB (instead of --gpu).")] = None,
    step_s: Annotated[float | None, typer.Option(
        help="Seconds one pretrain step took on one GPU (measured): also predict the step on more GPUs of --gpu's "
             "type from ZeRO's communication volume.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")] = False,
) -> None:
    """Per-GPU memory under ZeRO 0-3 with and without offload, and the cheapest setting that fits."""
    from branchout.cluster.gpu_memory import GiB, gpu_memory_gb
    from branchout.orchestrator.config.loader import SpecError, load_spec
    from branchout.orchestrator.config.plan import model_shape
    from branchout.orchestrator.run.display import print_memory_plan, print_step_prediction

    if gpu_mem is not None and not (math.isfinite(gpu_mem) and gpu_mem > 0):
        fail([f"--gpu-mem: {gpu_mem} is not a memory size (GiB > 0)"])
    if step_s is not None and not (math.isfinite(step_s) and step_s > 0):
        fail([f"--step-s: {step_s} is not a step time (seconds > 0)"])
    try:
        spec = load_spec(pipeline, set_)
        memory = gpu_mem * GiB / 1e9 if gpu_mem else (gpu_memory_gb(gpu) if gpu else None)
    except SpecError as e:
        fail([f"{e.source}: {p}" for p in e.problems])
    except ValueError as e:
        fail([str(e)])
    if step_s is not None and not (gpu or spec.pretrain.resources_per_worker.accelerator):
        fail(["--step-s: name the GPU type its links are read from (--gpu, or pretrain.resources_per_worker."
              "accelerator)"])
    shape = model_shape(spec)
    if as_json:
        sys.stdout.write(json.dumps(memory_plan_json(spec, shape, memory, gpu, step_s), indent=2) + "\n")
        return
    print_memory_plan(console, spec, shape, memory, gpu or (f"{gpu_mem:g} GiB" if gpu_mem else None))
    if step_s is not None:
        print_step_prediction(console, spec, shape, gpu or spec.pretrain.resources_per_worker.accelerator, step_s)


@app.command()
def run(pipeline: PipelineArg, set_: SetOpt = None, no_cache: NoCacheOpt = False, rerun: RerunOpt = None,
        run_id: Annotated[str | None, typer.Option(hidden=True, help="Use this run id (the scheduler's).")] = None) -> None:
    """Run a pipeline here (embedded local Ray unless cluster.address is set)."""
    from branchout.orchestrator.run.driver import run_pipeline
    from branchout.orchestrator.run.state import RunState

    spec = load_checked(pipeline, set_)
    check_rerun(spec, rerun)
    with reported():
        record = run_pipeline(spec, console, source=json.dumps(pipeline_source(pipeline, set_)),
                              use_cache=not no_cache, rerun=rerun, run_id=run_id)
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
    from branchout.orchestrator.config.checks import requirement_has_credentials
    from branchout.orchestrator.operate.control import submit_pipeline
    from branchout.orchestrator.operate.jobs import resolve_address

    leaked = [i for i, req in enumerate(pip or []) if requirement_has_credentials(req)]
    if leaked:  # never echoed: the requirement is the secret
        fail([f"--pip #{i + 1}: the requirement embeds credentials, which would be written into the Ray job's "
              "runtime_env (visible to anyone who can list jobs); use a package index the cluster can reach "
              "without them, or PIP_INDEX_URL set on the cluster" for i in leaked])
    spec = load_checked(pipeline, set_)
    check_rerun(spec, rerun)
    with reported():
        address = resolve_address(address, spec.cluster.address)
        record = submit_pipeline(spec, pipeline_source(pipeline, set_), address, open_registry(), working_dir, pip,
                                 {"use_cache": not no_cache, "rerun": rerun or []},
                                 say=lambda line: console.print(line, highlight=False))
    console.print(f"submitted run [bold]{record.run_id}[/] to {address} (Ray job {record.run_id})")
    console.print(f"  follow:  branchout logs {record.run_id} --follow")
    console.print(f"  status:  branchout status {record.run_id}")
    console.print(f"  outputs: {record.run_uri}")
    if wait:
        from branchout.orchestrator.cli.runs import logs
        from branchout.orchestrator.operate.control import refresh

        logs(record.run_id, follow=True)
        view = refresh(open_registry(), find_run(record.run_id))
        console.print(f"run {record.run_id}: {view.row.state}")
        raise typer.Exit(0 if view.row.state == "succeeded" else EXIT_FAILED)


@app.command(hidden=True)
def driver(
    run_id: Annotated[str | None, typer.Option(help="Start this new run (spec in BRANCHOUT_SPEC).")] = None,
    resume_uri: Annotated[str | None, typer.Option("--resume", help="Continue the run stored here.")] = None,
) -> None:
    """The pipeline driver of a submitted Ray job (what `branchout submit` runs on the cluster)."""
    import yaml

    from branchout import storage
    from branchout.core.spec import PipelineSpec
    from branchout.orchestrator.config.loader import validate_spec
    from branchout.orchestrator.run.driver import run_pipeline
    from branchout.orchestrator.run.state import RunRecord, RunState

    source = os.environ.get("BRANCHOUT_SOURCE")
    raw_spec = os.environ.get("BRANCHOUT_SPEC")
    options = json.loads(os.environ.get("BRANCHOUT_RUN_OPTIONS") or "{}")
    # the pipeline as its user wrote it (BRANCHOUT_SPEC is the copy whose inputs submit shipped)
    source_hash = os.environ.get("BRANCHOUT_SPEC_HASH")
    with reported():
        if resume_uri:
            record = RunRecord.load(resume_uri)
            spec = (PipelineSpec.model_validate_json(raw_spec) if raw_spec else validate_spec(
                yaml.safe_load(storage.read_text(storage.join(resume_uri, "spec.yaml"))), resume_uri))
            result = run_pipeline(spec, console, record=record, source=source, spec_hash_of_source=source_hash)
        else:
            if not (run_id and raw_spec):
                fail(["driver: needs --run-id and BRANCHOUT_SPEC, or --resume RUN_URI"])
            spec = PipelineSpec.model_validate_json(raw_spec)
            result = run_pipeline(spec, console, source=source, run_id=run_id, spec_hash_of_source=source_hash,
                                  **options)
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
    from branchout.orchestrator.run.state import RunRecord
    from branchout.stages.training.export import export_finetune

    row = find_run(run)
    try:
        record = RunRecord.load(row.run_uri)
    except (OSError, ValueError) as e:
        fail([f"run {row.run_id}: cannot read {row.run_uri}/state.json ({e})"])
    domains = sorted(record.of_kind("finetune"))
    job = record.of_kind("finetune").get(domain)
    if job is None:
        fail([f"--domain {domain!r}: run {row.run_id} has no such domain (domains: {', '.join(domains)})"])
    if not job.state.done:
        fail([f"--domain {domain}: its fine-tune is {job.state.value}, there is no model to export"])
    method = "lora" if job.outputs.get("parent") and _is_adapter(job.outputs["model_uri"]) else "full"
    with reported():
        written = export_finetune(job.outputs["model_uri"], job.outputs.get("parent"), method, domain, str(out),
                                  merge=merge, dtype=dtype)
    for path in written:
        console.print(f"wrote {path}")


def _is_adapter(model_uri: str) -> bool:
    from branchout import storage

    return storage.exists(storage.join(model_uri, "adapter_config.json"))


@app.command()
def schema() -> None:
    """Print the pipeline file's JSON Schema (for editors: see docs/pipeline.schema.json)."""
    from branchout.orchestrator.config.schema import render

    sys.stdout.write(render())


@app.command(hidden=True)
def probe(storage_uri: str, nonce: str) -> None:
    """Run on the cluster by `branchout submit`: can this node use the storage as the client does?"""
    from branchout import storage

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
