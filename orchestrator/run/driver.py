"""The pipeline driver: tokenizer → data → pretrain → fan-out → evaluate → report.

``run_pipeline`` reads top to bottom as the pipeline does. Each stage is a handful of
jobs (the tokenizer, one data job per dataset, the pretrain, a fine-tune and a baseline
per domain, an evaluation per domain); ``orchestrator.run.fanout.run_jobs`` runs a stage's
jobs concurrently and records their states. The driver is the only writer of the run
record. The same code runs under ``branchout run`` (embedded Ray) and as a submitted
Ray job (``RAY_ADDRESS`` set by Ray).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import yaml
from rich.console import Console

from branchout import storage
from branchout.cluster.autoscale import CapacityHints, stage_bundles
from branchout.cluster.connect import ClusterInfo, connect
from branchout.core.graph import JobGraph, Kind, Node, build_graph, corpora
from branchout.core.progress import start_hub
from branchout.core.spec import PipelineSpec
from branchout.orchestrator.config.plan import Plan, build_plan
from branchout.orchestrator.run.cache import StageCache, data_fingerprints, job_keys
from branchout.orchestrator.run.checks import check_capacity, check_shared_storage
from branchout.orchestrator.run.context import RunContext
from branchout.orchestrator.run.display import ProgressView, print_plan, print_results
from branchout.orchestrator.run.evaluations import Evaluations, stage_evaluate
from branchout.orchestrator.run.fanout import WorkItem, submit_task
from branchout.orchestrator.run.node_jobs import ready_now, run_ready
from branchout.orchestrator.run.pool import PoolSet
from branchout.orchestrator.run.report import (
    read_run_metrics,
    write_report,
)
from branchout.orchestrator.run.state import (
    JobRecord,
    JobState,
    RunRecord,
    RunState,
    new_run_id,
)
from branchout.orchestrator.run.tracking import Tracker
from branchout.stages.job import (
    DataJob,
    ImportJob,
    TokenizerJob,
    TrainJob,
)
from branchout.stages.prepare.data import PackedInfo


class StageFailedError(RuntimeError):
    """A stage cannot continue; the message names the job and the cause."""


def run_pipeline(spec: PipelineSpec, console: Console, record: RunRecord | None = None,
                 source: str | None = None, run_id: str | None = None, use_cache: bool = True,
                 rerun: list[str] | None = None, spec_hash_of_source: str | None = None) -> RunRecord:
    """Run every stage of ``spec``; returns the final run record (never raises for job failures).

    With ``record`` (``branchout resume``) the run continues: jobs it shows as succeeded are
    not run again, and unfinished ones resume from their newest checkpoint.
    ``spec_hash_of_source``: the hash of the pipeline as the user wrote it, when ``spec`` is
    the copy a submit rewrote (shipped inputs): what `branchout resume` compares the file with.
    """
    from branchout.orchestrator.operate.registry import Registry, driver_identity

    graph = build_graph(spec)  # every job, once: the stages, cache keys, plan and bundles read it
    plan = build_plan(spec, graph)
    print_plan(console, plan, spec.notes)
    storage.check_reachable(spec.storage)
    with connect(spec.cluster) as cluster, stop_on_sigterm():
        check_shared_storage(spec, cluster)
        check_capacity(spec, cluster)
        resuming = record is not None
        record = record or create_run(spec, graph, run_id)
        if spec_hash_of_source:
            record.spec_hash = spec_hash_of_source
        record.attach(Registry(), source=source, **driver_identity())
        if resuming:
            record.interrupted("interrupted: its driver stopped before it finished")
        console.print(f"{'resuming' if resuming else 'run'} [bold]{record.run_id}[/] → {record.run_uri}")
        cache = StageCache(spec.storage, enabled=use_cache, skip=graph.select(rerun or []))
        fingerprints = data_fingerprints(graph)
        keys = job_keys(graph, fingerprints)
        with driver_log(record) as log, ProgressView(console, log=log) as view:
            print_plan(log, plan, spec.notes)
            log.print(f"{'resuming' if resuming else 'run'} {record.run_id} → {record.run_uri}")
            tracker = Tracker(spec, record, view.note)
            _run_stages(spec, graph, plan, record, cluster, view, cache, keys, fingerprints, tracker)
            metrics = read_run_metrics(record)
            report_path = write_report(record, metrics) if metrics else None
            tracker.finish(metrics, record.run_uri if report_path else None)
            for out in (console, log):
                print_results(out, record, metrics, report_path)
    return record


@contextmanager
def driver_log(record: RunRecord) -> Iterator[Console]:
    """``logs/driver.log`` of the run: the plan, every state change, the results.

    Written in place on local storage (so ``branchout logs --follow`` can tail it), and
    uploaded when the driver ends for object storage.
    """
    import tempfile

    uri = storage.join(record.run_uri, "logs", "driver.log")
    local = storage.local_path(uri) if storage.is_local(uri) else os.path.join(tempfile.mkdtemp(), "driver.log")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with open(local, "a", buffering=1) as f:
        yield Console(file=f, width=200, no_color=True, force_terminal=False, soft_wrap=True)
    if not storage.is_local(uri):
        with open(local, "rb") as f:
            storage.write_bytes(uri, f.read())


def _run_stages(spec: PipelineSpec, graph: JobGraph, plan: Plan, record: RunRecord, cluster: ClusterInfo,
                view: ProgressView, cache: StageCache, keys: dict[str, str],
                fingerprints: dict[str, str], tracker: Tracker) -> None:
    registry = getattr(record, "_registry", None)
    hints = CapacityHints(
        enabled=spec.cluster.autoscaling and spec.cluster.request_ahead and not cluster.embedded, log=view.note,
        requester=f"branchout-{record.run_id}",
        on_request=(lambda reason, bundles: registry.log_event("capacity", record.run_id, reason, bundles=bundles))
        if registry else None)
    ctx = RunContext(spec, graph, plan, record, cluster, view, hints, cache, keys, fingerprints, tracker,
                     hub=start_hub(record.run_id))
    record.set_run_state(RunState.RUNNING)
    try:
        # after each stage, the jobs of kinds without a stage of their own whose parents are done
        tokenizer = stage_tokenizer(ctx)
        run_ready(ctx)
        data = stage_data(ctx, tokenizer)
        run_ready(ctx)
        base_uri = stage_pretrain(ctx, tokenizer, data)  # what reads only the base runs beside the fan-out
        # one set of warm runners for the fan-out and its evaluations
        pools = PoolSet(base_uri, spec.finetune.max_concurrent, fixed_cluster=not spec.cluster.autoscaling)
        ctx.pools = pools if spec.finetune.warm_pool else None
        evaluations = Evaluations(ctx, data, base_uri, tokenizer["uri"], pools)
        try:
            # an evaluation, a cross or lm_eval job starts beside the fan-out once what it reads is done
            stage_finetune(ctx, tokenizer, data, base_uri, pools, beside=lambda: [*evaluations.ready(), *ready_now(ctx)])
            run_ready(ctx)
            stage_evaluate(ctx, evaluations, beside=lambda: ready_now(ctx))
            run_ready(ctx)
        finally:
            pools.shutdown()
        skip_pending(record)  # jobs something they need failed for
        failed = [n for n, r in record.jobs.items() if r.state is JobState.FAILED]
        if failed:
            record.set_run_state(RunState.FAILED, error=f"failed: {', '.join(failed)}")
        else:
            record.set_run_state(RunState.SUCCEEDED)
    except StageFailedError as e:
        skip_pending(record)
        record.set_run_state(RunState.FAILED, error=str(e))
    except (KeyboardInterrupt, StopRequestedError) as e:
        record.interrupted("stopped before it finished", RunState.STOPPED, str(e) or "interrupted")
    finally:
        hints.clear()  # let idle nodes go, whatever happened
        view.update(record, {})
        ctx.threads.shutdown(wait=False, cancel_futures=True)


class StopRequestedError(Exception):
    """SIGTERM: ``branchout stop`` or Ray's job stop asked this driver to end."""


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into an exception in the main thread, so the run is recorded as stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        # a second SIGTERM (e.g. while the driver records the stop) kills as usual
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise StopRequestedError("stopped by request (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- run creation ------------------------------------------------------------------


def create_run(spec: PipelineSpec, graph: JobGraph, run_id: str | None = None) -> RunRecord:
    """Make the run directory with the resolved spec, and a record listing every job of ``graph``."""
    run_id = run_id or new_run_id()
    run_uri = storage.join(spec.storage, spec.name, run_id)
    resolved = spec.model_dump(mode="json")
    storage.write_text(storage.join(run_uri, "spec.yaml"), yaml.safe_dump(resolved, sort_keys=False))
    record = RunRecord(run_id=run_id, pipeline=spec.name, run_uri=run_uri, spec_hash=spec_hash(spec))
    for node in graph:
        record.jobs[node.name] = JobRecord(node.name, kind=node.kind.value, domain=node.domain,
                                           parents=list(node.parents.values()))
    record.save()
    return record


def spec_hash(spec: PipelineSpec) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def skip_pending(record: RunRecord) -> None:
    for name, rec in record.jobs.items():
        if rec.state in (JobState.PENDING, JobState.QUEUED):
            record.set_job(name, JobState.SKIPPED)


def _require(results: dict[str, dict[str, Any]], record: RunRecord, names: list[str]) -> dict[str, dict[str, Any]]:
    failed = [n for n in names if n not in results]
    if failed:
        errors = "; ".join(f"{n}: {record.job(n).error}" for n in failed)
        raise StageFailedError(errors)
    return results


# ---- stages --------------------------------------------------------------------------


def stage_tokenizer(ctx: RunContext) -> dict[str, str]:
    """Train (or copy in) the tokenizer; returns its URI in the run and its content hash."""
    from branchout.stages.prepare.tokenizer import tokenizer_job

    node = ctx.graph.of(Kind.TOKENIZER)[0]
    ev, uri = ctx.spec.evaluate, ctx.out_uri(node)
    sources = tuple((c.dataset, c.weight) for c in corpora(ctx.spec.pretrain))
    job = TokenizerJob(node.section, sources, ev.heldout_fraction, ev.split_seed, uri)
    item = WorkItem(node.name, lambda: submit_task(tokenizer_job, (job,), node.resources, node.name, ctx.hub_name),
                    on_success=lambda h: {"uri": uri, "hash": h})
    return _require(ctx.run([item]), ctx.record, [node.name])[node.name]


def stage_data(ctx: RunContext, tokenizer: dict[str, str]) -> dict[str, PackedInfo]:
    """Tokenize and pack every dataset (once per distinct dataset and block length): the
    pretraining corpus first, then every domain at once, each decontaminated against the
    pretraining corpus's training text (a domain's held-out documents that are mostly that
    text are not scored). Returns each data job's output by its dataset's name."""
    from branchout.stages.prepare.data import prepare

    ev = ctx.spec.evaluate
    cache_root = storage.join(ctx.spec.storage, "cache", "data")
    done: dict[str, dict] = {}

    def item(node: Node) -> WorkItem:
        references = tuple(done[p]["uri"] for role, p in node.parents.items() if role.startswith("reference"))
        job = DataJob(dataset=node.section, tokenizer_uri=tokenizer["uri"], tokenizer_hash=tokenizer["hash"],
                      seq_len=node.seq_len, heldout_fraction=ev.heldout_fraction, split_seed=ev.split_seed,
                      cache_root=cache_root, reference_uris=references,
                      fingerprint=ctx.fingerprints[node.reads], name=node.name, hub_name=ctx.hub_name)
        return WorkItem(node.name, lambda: submit_task(prepare, (job,), node.resources, node.name, ctx.hub_name),
                        on_success=lambda info: {**asdict(info), "fingerprint": job.fingerprint})

    nodes = ctx.graph.of(Kind.DATA)
    # in waves: a dataset whose reference is not prepared yet waits for it
    while len(done) < len(nodes):
        wave = [item(n) for n in nodes if n.name not in done
                and all(p in done for p in n.parents.values() if ctx.graph[p].kind is Kind.DATA)]
        done.update(_require(ctx.run(wave), ctx.record, [i.name for i in wave]))
    packed = {n.domain: PackedInfo.from_dict(done[n.name]) for n in nodes}
    for n in nodes:  # computed now or reused from the cache alike
        line = small_heldout(packed[n.domain], ev)
        if line:
            ctx.view.note(f"warning: {n.name}: {line}")
            record = ctx.record.job(n.name)
            if line not in record.outputs.get("warnings", []):
                ctx.record.set_job(n.name, record.state, outputs={"warnings": [*record.outputs.get("warnings", []), line]})
    return packed


def small_heldout(info: PackedInfo, ev) -> str | None:
    """Why a dataset's held-out scores are not to be relied on, or None: fewer held-out
    documents or tokens than ``evaluate.min_heldout_docs``/``min_heldout_tokens`` (what
    decontamination left: repeated documents move to training)."""
    short = []
    if info.heldout_docs < ev.min_heldout_docs:
        short.append(f"{info.heldout_docs} held-out documents (evaluate.min_heldout_docs: {ev.min_heldout_docs})")
    if info.heldout_tokens < ev.min_heldout_tokens:
        short.append(f"{info.heldout_tokens:,} held-out tokens (evaluate.min_heldout_tokens: {ev.min_heldout_tokens})")
    if not short:
        return None
    moved = f"; {info.heldout_moved_near_duplicates} near-duplicates of training text moved to training" \
        if info.heldout_moved_near_duplicates else ""
    return (f"only {' and '.join(short)}{moved}: its perplexity is not reliable (more data, or a larger "
            "evaluate.heldout_fraction)")


def stage_pretrain(ctx: RunContext, tokenizer: dict[str, str], data: dict[str, PackedInfo]) -> str:
    """DeepSpeed pretrain on Ray Train; returns the URI of the exported base model. ``data``:
    every data job's output by dataset name (a mixture reads each of its sources)."""
    from branchout.orchestrator.run.ray_train import run_distributed

    spec, node = ctx.spec, ctx.graph.of(Kind.PRETRAIN)[0]
    if ctx.graph.pretrain_steps == 0:  # branch straight from the given model
        return import_base(ctx, node, tokenizer)
    sources = corpora(spec.pretrain)
    job = TrainJob(
        name=node.name, kind="pretrain", training=node.section,
        steps=ctx.graph.pretrain_steps, model_type=spec.model.type, model_overrides=spec.model.config,
        tokenizer_uri=tokenizer["uri"], data_uri=data[sources[0].key].uri, out_uri=ctx.out_uri(node),
        logs_uri=ctx.uri("logs"), run_id=ctx.record.run_id, hub_name=ctx.hub_name,
        model_path=spec.model.path, model_revision=spec.model.revision,
        mixture=tuple((c.key, data[c.key].uri, c.weight) for c in sources) if spec.pretrain.datasets else (),
        probes=probe_targets(spec, data),
    )
    item = WorkItem(node.name, ctx.claiming(job, lambda: ctx.threads.submit(run_distributed, job, node.section.max_failures)),
                    on_success=lambda r: training_outputs(job, r), resources=node.resources)
    bundles = stage_bundles(ctx.graph)
    ctx.hints.request(bundles["pretrain"], "pretrain")
    last_interval = max(0, job.steps - node.section.checkpoint_every)
    ahead: list[bool] = []

    def fanout_ahead(snapshot: dict) -> None:
        # the fan-out's nodes boot while the last checkpoint interval trains
        if snapshot.get(node.name, {}).get("step", 0) >= last_interval and not ahead:
            ahead.append(True)
            ctx.hints.request(bundles["pretrain"] + bundles["fanout"], "pretrain in its last interval; fan-out ahead")

    outputs = _require(ctx.run([item], on_tick=fanout_ahead), ctx.record, [node.name])[node.name]
    ctx.hints.request(bundles["fanout"], "fan-out")
    forecast = storage.join(ctx.out_uri(node), "probes", "forecast.json")
    if spec.pretrain.probes and storage.exists(forecast):  # the probes' forecasts, beside the scores
        storage.write_text(ctx.uri("eval", "forecast.json"), storage.read_text(forecast))
    return outputs["model_uri"]


def probe_targets(spec: PipelineSpec, data: dict[str, PackedInfo]) -> tuple:
    """``pretrain.probes``: each domain as a probe fine-tunes it, on the pretrain's workers: its own
    options, with the probe's steps and method (``domain``: the domain's own), one worker on the
    pretrain worker's resources, its held-out loss scored at its last step and nothing kept or
    mixed in."""
    from branchout.stages.training.probes import ProbeTarget

    p = spec.pretrain
    if p.probes is None:
        return ()
    steps = p.probes.steps
    out = []
    for d in spec.finetune.domains:
        method = d.method if p.probes.method == "domain" else p.probes.method
        engine = d.deepspeed.model_copy(update={"engine": "auto", "offload_optimizer": False, "offload_params": False,
                                                "precision": p.deepspeed.precision})
        options = d.model_copy(update={
            "steps": steps, "method": method, "num_workers": 1, "seq_len": spec.domain_seq_len(d),
            "resources_per_worker": p.resources_per_worker, "deepspeed": engine, "eval_every": steps,
            "keep_best": False, "early_stop": None, "replay": 0.0, "farm": False, "checkpoint_every": steps,
            "log_every": steps, "micro_batch_size": min(d.micro_batch_size, d.global_batch_size)})
        out.append(ProbeTarget(d.name, data[d.name].uri, options))
    return tuple(out)


def replay_sources(spec: PipelineSpec, node: Node, data: dict[str, PackedInfo]) -> tuple:
    """``replay``: (name, packed data, share of the blocks) of each pretraining corpus a fine-tune
    replays (its ``replay:<corpus>`` parents), each corpus's share of ``replay`` its weight in
    the pretraining mixture."""
    replayed = {role.removeprefix("replay:") for role in node.parents if role.startswith("replay:")}
    return tuple((c.key, data[c.key].uri, node.section.replay * c.weight)
                 for c in corpora(spec.pretrain) if c.key in replayed)


def training_outputs(job: TrainJob, r: dict[str, Any]) -> dict[str, Any]:
    """What the run record keeps of a training job's result (pretrain, fine-tune, baseline)."""
    out = {"model_uri": job.model_uri, "final_loss": r["final_loss"], "tokens_per_s": r["tokens_per_s"],
           "resumed_from": r["first_step"], "precision": r.get("precision"), "workers": r.get("workers")}
    if r.get("rollbacks"):  # training.nan_rollbacks: the report's warnings say what was undone
        out["warnings"] = [f"NaN rollback: {line}" for line in r["rollbacks"]]
    if r.get("farm"):  # trained in an adapter farm (the report says which domains trained together)
        out["farm"] = r["farm"]
    if r.get("mixture_blocks"):  # a pretraining mixture: blocks read per source
        out["mixture_blocks"] = r["mixture_blocks"]
    # eval_every on a fine-tune: the best scored step, the one exported, where it stopped early
    out.update({k: r[k] for k in ("best_step", "best_eval_loss", "exported_step", "stopped_early_at") if k in r})
    # pretrain.probes: where it probed, what that cost, and where and why it stopped early
    out.update({k: r[k] for k in ("probe_points", "probe_seconds", "stopped_at", "stop_reason", "tokens_saved")
                if k in r})
    return out


def import_base(ctx: RunContext, node: Node, tokenizer: dict[str, str]) -> str:
    """``pretrain.steps: 0``: publish ``model.path`` as the run's base (a copy, no training)."""
    from branchout.stages.training.model import import_model

    spec = ctx.spec
    job = ImportJob(spec.model.path, spec.model.revision, tokenizer["uri"], storage.join(ctx.out_uri(node), "model"))
    item = WorkItem(node.name, lambda: submit_task(import_model, (job,), node.resources, node.name, ctx.hub_name),
                    on_success=lambda r: {"model_uri": r["model_uri"], "imported_from": r["imported_from"],
                                          "resumed_from": 0})
    return _require(ctx.run([item]), ctx.record, [node.name])[node.name]["model_uri"]


def stage_finetune(ctx: RunContext, tokenizer: dict[str, str], data: dict[str, PackedInfo],
                   base_uri: str, pools: PoolSet, beside: Callable[[], list[WorkItem]] | None = None) -> None:
    """One fine-tune per domain from the shared base, plus from-scratch baselines, concurrently
    (every fine-tune is submitted before the first baseline). ``beside``: the jobs that can
    start now as well (asked again whenever one ends)."""
    from branchout.orchestrator.run.pool import FarmSet

    spec = ctx.spec
    items = []
    singles: dict[tuple, list[str]] = {}  # bundle → names of its single-worker jobs
    farms = FarmSet(base_uri, tokenizer["uri"])
    members = Counter(n.farm for n in ctx.graph.of(Kind.FINETUNE) if n.farm)  # farm → its members
    for node in ctx.graph.of(Kind.FINETUNE, Kind.SCRATCH):
        t = node.section  # the domain's options (a DomainSpec; a baseline's method is full)
        from_base = "base" in node.parents
        job = TrainJob(
            name=node.name, kind=node.kind.value, training=t, steps=t.steps,
            model_type=spec.model.type, model_overrides=spec.model.config,
            model_path=spec.model.path, model_revision=spec.model.revision,
            tokenizer_uri=tokenizer["uri"], data_uri=data[node.domain].uri,
            out_uri=ctx.out_uri(node), logs_uri=ctx.uri("logs"), run_id=ctx.record.run_id,
            hub_name=ctx.hub_name, method=t.method, base_model_uri=base_uri if from_base else None,
            replay=replay_sources(spec, node, data),
        )
        deepspeed = t.uses_deepspeed()
        group = [] if deepspeed or node.farm else singles.setdefault(tuple(sorted(node.resources.items())), [])
        group.append(job.name)
        submit = _submitter(ctx, job, deepspeed, node.resources, t.max_failures, pools, group)
        if node.farm:  # its first attempt in its farm; a retry (evicted, or the farm died) alone
            submit = _first_in_farm(lambda job=job, node=node: farms.submit(job, node.farm, node.resources,
                                                                            members[node.farm]), submit)
        items.append(WorkItem(job.name, ctx.claiming(job, submit), max_retries=t.max_retries,
                              resources=node.resources,
                              on_success=lambda r, job=job: {**training_outputs(job, r),
                                                             "parent": job.base_model_uri}))
    try:
        ctx.run(items, max_in_flight=spec.finetune.max_concurrent, more=beside)
    finally:
        farms.shutdown()
    for item in items:  # recorded as succeeded: its resume points are no longer needed
        if ctx.record.job(item.name).state is JobState.SUCCEEDED:
            storage.remove_dir(ctx.uri(*ctx.graph[item.name].path, "checkpoints"))


def _first_in_farm(in_farm: Callable[[], cf.Future], alone: Callable[[], cf.Future]) -> Callable[[], cf.Future]:
    attempts: list[int] = []

    def submit() -> cf.Future:
        attempts.append(1)
        return in_farm() if len(attempts) == 1 else alone()

    return submit


def _submitter(ctx: RunContext, job: TrainJob, deepspeed: bool, resources: dict[str, float],
               max_failures: int, pools, group: list[str]):
    """DeepSpeed jobs (several workers, offload) go through Ray Train from a driver thread;
    single-worker ones go to a warm pool (or, with ``finetune.warm_pool: false``, each to
    its own Ray task). ``group``: the jobs sharing this job's bundle, which size its pool."""
    from branchout.orchestrator.run.ray_train import run_distributed
    from branchout.stages.training.single_worker import run_single_worker

    if deepspeed:
        return lambda: ctx.threads.submit(run_distributed, job, max_failures)
    if not ctx.spec.finetune.warm_pool:
        return lambda: submit_task(run_single_worker, (job,), resources, job.name, ctx.hub_name)
    return lambda: pools.submit(job, resources, sum(not ctx.record.job(n).state.done for n in group))


