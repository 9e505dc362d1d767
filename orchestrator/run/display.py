"""What the user sees: the plan, live progress of stages and domain jobs, the results.

On a terminal the progress is a live table redrawn a few times a second; elsewhere
(CI logs, a submitted job's log) it is one plain line per state change plus a progress
line every ``quiet_interval`` seconds, so logs stay readable.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from branchout.core.graph import Kind
from branchout.orchestrator.config.plan import Plan
from branchout.orchestrator.run.state import JobState, RunRecord

_STYLE = {
    JobState.PENDING: "dim", JobState.QUEUED: "yellow", JobState.RUNNING: "cyan",
    JobState.SUCCEEDED: "green", JobState.FAILED: "bold red", JobState.SKIPPED: "dim",
    JobState.CACHED: "blue",
}


def print_plan(console: Console, plan: Plan, notes: list[str] | None = None) -> None:
    console.print(f"[bold]Plan for {plan.pipeline}[/]  ({plan.cluster})")
    for note in notes or []:
        console.print(f"  note: {note}", highlight=False)
    console.print(f"  model: {plan.model_type}, {plan.params / 1e6:.2f}M parameters "
                  f"({plan.non_embedding_params / 1e6:.2f}M non-embedding), vocab {plan.vocab_size:,}")
    p = plan.pretrain
    # One worker without offload gives DeepSpeed nothing to do; say so rather than
    # let a configured zero_stage look as if it applied.
    zero = ("plain torch (1 worker: ZeRO has nothing to partition)" if p.zero_stage is None
            else f"DeepSpeed ZeRO-{p.zero_stage}")
    console.print(f"  pretrain: {p.arithmetic()}")
    console.print(f"            {p.steps:,} steps = {p.total_tokens:,} tokens; {p.checkpoints} checkpoint(s); "
                  f"{zero}, {p.precision_text()}; ~{p.memory_gib:.2f} GiB/worker; "
                  f"{plan.flops_per_token(p.seq_len) / 1e6:.1f} MFLOP/token", highlight=False, markup=False)
    for name, tp in [("pretrain", p), *plan.domains.items()]:
        if tp.precision_warning:
            console.print(f"  warning: {name}: {tp.precision_warning}", highlight=False, markup=False)
    console.print("  held-out split: decontaminated (near-duplicates of training text move to training; "
                  "domain documents that are mostly pretraining text are not scored); the counts are "
                  "printed with the results and in the report", highlight=False)
    evaluations = [j for j in plan.jobs if j.kind == "evaluate"]
    table = Table(title=f"fan-out: {plan.fanout_jobs} jobs, and {len(evaluations)} evaluation(s), each once its "
                        f"domain's models are done ({', '.join(plan.eval_models)} scored)", title_justify="left",
                  show_edge=False)
    for col in ("job", "tokens/step", "steps", "tokens", "engine", "resources", "mem/worker"):
        table.add_column(col, justify="left" if col in ("job", "engine", "resources") else "right")
    for job in plan.jobs:
        d = plan.domains[job.domain]
        trains = job.kind != "evaluate"
        table.add_row(job.name, f"{d.tokens_per_step:,}" if trains else "-", f"{job.steps:,}" if trains else "-",
                      f"{job.tokens:,}", job.engine,
                      _bundle(job.resources), f"{job.memory_gib:.2f} GiB")
    console.print(table)
    _print_other_jobs(console, plan)


def _print_other_jobs(console: Console, plan) -> None:
    """Jobs of kinds run from their graph node (e.g. ``cross``), a line per kind."""
    for kind in dict.fromkeys(j.kind for j in plan.others):
        jobs = [j for j in plan.others if j.kind == kind]
        console.print(f"  then {len(jobs)} {kind} job(s), each once what it reads is done ({jobs[0].engine}): "
                      + ", ".join(f"{j.name} [{_bundle(j.resources)}]" for j in jobs), highlight=False, markup=False)


def _bundle(b: dict[str, float]) -> str:
    return " ".join(f"{k}={v:g}" for k, v in b.items())


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, int | float) else "-"


class ProgressView:
    """Draws the run record plus the hub's live numbers; call ``update`` often."""

    def __init__(self, console: Console, quiet_interval: float = 30.0, log: Console | None = None):
        self.console = console
        self.log = log  # the run's driver.log: always plain lines, whatever the terminal
        self.live = Live(console=console, refresh_per_second=4, transient=False) if console.is_terminal else None
        self.quiet_interval = quiet_interval
        self._last_quiet = 0.0
        self._seen: dict[str, JobState] = {}
        self._precision_told: set[str] = set()

    def __enter__(self) -> ProgressView:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self.live.__exit__(*exc)

    def note(self, text: str) -> None:
        """A one-off line (capacity hints, waiting for resources) on screen and in driver.log."""
        line = f"{time.strftime('%H:%M:%S')} {text}"
        for c in (self.console, self.log):
            if c is not None:
                c.print(line, highlight=False, markup=False)

    def update(self, record: RunRecord, snapshot: dict[str, dict[str, Any]]) -> None:
        plain = [c for c in (None if self.live else self.console, self.log) if c is not None]
        if self.live:
            self.live.update(self._render(record, snapshot))
        now = time.time()
        for name, rec in record.jobs.items():
            if self._seen.get(name) is not rec.state:
                self._seen[name] = rec.state
                extra = f": {rec.error}" if rec.error and rec.state is JobState.FAILED else ""
                for c in plain:
                    c.print(f"{time.strftime('%H:%M:%S')} {name}: {rec.state.value}{extra}", highlight=False)
        for name, live in snapshot.items():
            self._tell_precision(name, live.get("precision"))
        if now - self._last_quiet >= self.quiet_interval:
            self._last_quiet = now
            for name, live in snapshot.items():
                rec = record.jobs.get(name)
                if rec and rec.state is JobState.RUNNING and "step" in live:
                    for c in plain:
                        c.print(f"{time.strftime('%H:%M:%S')} {name}: {self._progress_text(rec, live)}",
                                highlight=False)

    def _tell_precision(self, name: str, decided: Any) -> None:
        """Once per job: the precision its workers decided, and a warning if it will be slow."""
        if not isinstance(decided, dict) or name in self._precision_told:
            return
        from branchout.core.precision import Precision

        self._precision_told.add(name)
        precision = Precision(**decided)
        self.note(f"{name}: precision {precision.line()}")
        if precision.warning:
            self.note(f"warning: {name}: {precision.warning}")

    @staticmethod
    def _progress_text(rec, live: dict[str, Any]) -> str:
        step, total = live.get("step", 0), live.get("total_steps") or 0
        eta = "-"
        if rec.started and step and total:
            # rate over this attempt's own steps, so a resumed job's ETA is not inflated
            done_here = step - live.get("resumed_from", 0)
            if done_here > 0:
                eta = f"{(time.time() - live.get('started', rec.started)) / done_here * (total - step):.0f}s"
        return (f"step {step}/{total}  loss {_fmt(live.get('loss'), '.3f')}  "
                f"{_fmt(live.get('tokens_per_s'), ',.0f')} tok/s  ETA {eta}")

    def _render(self, record: RunRecord, snapshot: dict[str, dict[str, Any]]):
        table = Table(show_edge=False, title=f"run {record.run_id}", title_justify="left")
        for col in ("stage / job", "state", "progress", "elapsed"):
            table.add_column(col)
        now = time.time()
        for name, rec in record.jobs.items():
            live = snapshot.get(name, {})
            progress = self._progress_text(rec, live) if rec.state is JobState.RUNNING and "step" in live else ""
            if rec.state is JobState.FAILED and rec.error:
                progress = rec.error[:100]
            elapsed = ((rec.ended or now) - rec.started) if rec.started else None
            table.add_row(name, f"[{_STYLE[rec.state]}]{rec.state.value}[/]", progress,
                          f"{elapsed:.0f}s" if elapsed is not None else "")
        return Group(table)


def print_results(console: Console, record: RunRecord, metrics: dict[str, Any] | None,
                  report_path: str | None) -> None:
    table = Table(title="results (held-out perplexity, lower is better)", title_justify="left")
    for col in ("domain", "finetune", "base ppl", "finetuned ppl", "scratch ppl", "gain vs base"):
        table.add_column(col, justify="left" if col in ("domain", "finetune") else "right")
    domains = (metrics or {}).get("domains", {})
    for name, job in record.of_kind("finetune").items():
        m = domains.get(name, {})
        gain = m.get("transfer_gain")
        table.add_row(name, f"[{_STYLE[job.state]}]{job.state.value}[/]",
                      _fmt(m.get("base_ppl"), ".2f"), _fmt(m.get("finetuned_ppl"), ".2f"),
                      _fmt(m.get("scratch_ppl"), ".2f"), f"{gain:.1%}" if isinstance(gain, float) else "-")
    console.print(table)
    for name, job in record.of_kind("data").items():
        moved = job.outputs.get("heldout_moved_near_duplicates", 0)
        dropped = job.outputs.get("heldout_dropped_pretraining_overlap", 0)
        if moved or dropped:  # what the decontaminated split changed, so scores are read right
            console.print(f"held-out split of {name}: {job.outputs.get('heldout_docs', 0)} documents scored; "
                          f"{moved} near-duplicates of training text moved to training, "
                          f"{dropped} mostly-pretraining documents not scored", highlight=False)
    seconds = (record.ended or time.time()) - (record.started or record.created)
    colour = "green" if record.state.value == "succeeded" else "red"
    console.print(f"run {record.run_id}: [{colour}]{record.state.value}[/] in {seconds:.0f}s"
                  + (f" — {record.error}" if record.error else ""))
    console.print(f"run directory: {record.run_uri}")
    if report_path:
        console.print(f"report: {report_path}")


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _duration(start: float | None, end: float | None) -> str:
    if not start:
        return "-"
    seconds = (end or time.time()) - start
    return f"{seconds / 3600:.1f}h" if seconds >= 3600 else f"{seconds:.0f}s"


def print_run_list(console: Console, rows, title: str = "runs", registry=None) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("run", "pipeline", "state", "user", "started", "took", "domains", "where", "run directory"):
        table.add_column(col, overflow="fold")
    for row in rows:
        domains = "-"
        if registry is not None:
            # registry rows hold the job's name, "<kind>/<domain>" (core.graph)
            fts = [j for j in registry.jobs_of(row.run_id) if j["name"].partition("/")[0] == Kind.FINETUNE]
            if fts:
                domains = f"{sum(j['state'] == 'succeeded' for j in fts)}/{len(fts)}"
        state = JobState(row.state) if row.state in JobState._value2member_map_ else None
        style = _STYLE.get(state, "")
        where = row.address if row.submitted else (row.driver_host or "local")
        table.add_row(row.run_id, row.pipeline, f"[{style}]{row.state}[/]" if style else row.state,
                      row.user or "-", _when(row.started or row.created), _duration(row.started, row.ended),
                      domains, untrusted(where), untrusted(row.run_uri))
    console.print(table if rows else f"no {title}")


def untrusted(text: str) -> str:
    """Text from a user's file, data or storage, made safe to print: control characters
    (terminal escape sequences among them) shown as ``\\xNN``, rich markup escaped (a name
    containing ``[/x]`` would otherwise end the print with a MarkupError)."""
    from rich.markup import escape

    shown = "".join(c if c.isprintable() or c == "\t" else f"\\x{ord(c):02x}" for c in text)
    return escape(shown)


def print_status(console: Console, view) -> None:
    """``branchout status RUN``: the run, then one row per job with attempts and outputs."""
    from branchout.stages.training.metrics import read_metrics
    from branchout.storage import join

    row, record = view.row, view.record
    console.print(f"[bold]run {row.run_id}[/]  pipeline {row.pipeline}  state [bold]{row.state}[/]  "
                  f"user {row.user or '-'}")
    console.print(f"  started {_when(row.started)}  ended {_when(row.ended)}  took {_duration(row.started, row.ended)}")
    console.print(f"  run directory {row.run_uri}")
    if row.submitted:
        console.print(f"  submitted to {row.address} as Ray job {row.submissions[-1]}"
                      + (f" ({view.job_status})" if view.job_status else ""))
    # one line each, however long: users grep them and tests match them
    if row.error:
        console.print(f"  [red]error: {row.error}[/]", soft_wrap=True, highlight=False)
    if view.note and not (record is None and row.started is None and row.error):
        # a run whose driver failed before it began has no state.json: the error says why
        console.print(f"  note: {view.note}", soft_wrap=True, highlight=False)
    if record is None:
        return
    table = Table(show_edge=False)
    for col in ("job", "state", "attempts", "progress", "started", "took", "output / error"):
        table.add_column(col, overflow="fold")
    logs = join(record.run_uri, "logs")
    for name, rec in record.jobs.items():
        progress = ""
        if rec.state is JobState.RUNNING:
            points = read_metrics(logs, name)
            if points:
                last = points[-1]
                progress = f"step {last['step']}/{rec.metrics.get('total_steps') or '?'} loss {last.get('loss', 0):.3f}"
        elif rec.state.done and "final_loss" in rec.outputs:
            progress = f"loss {rec.outputs['final_loss']:.3f}"
        detail = rec.error if rec.state is JobState.FAILED else rec.outputs.get("model_uri", "")
        table.add_row(name, f"[{_STYLE[rec.state]}]{rec.state.value}[/]", str(rec.attempts), progress,
                      _when(rec.started), _duration(rec.started, rec.ended) if rec.started else "-",
                      untrusted(detail or ""))
        for attempt in rec.history[:-1] if len(rec.history) > 1 else []:
            table.add_row("", f"[dim]attempt {attempt['attempt']}[/]", "", "", _when(attempt["started"]),
                          _duration(attempt["started"], attempt["ended"]),
                          f"[dim]{attempt['state']}: {untrusted(attempt.get('error') or '')}[/]")
        for warning in rec.outputs.get("warnings", []):
            table.add_row("", "[yellow]warning[/]", "", "", "", "", f"[yellow]{untrusted(warning)}[/]")
    console.print(table)


def print_memory_plan(console: Console, spec, shape, gpu_memory_gb: float | None, gpu_label: str | None) -> None:
    """``branchout plan``: one table per distributed job, the cheapest fitting option marked."""
    from branchout.cluster.gpu_memory import GB, pick
    from branchout.orchestrator.config.plan import _gpu_memory, memory_options

    console.print(f"[bold]{spec.name}[/]: {shape.model_type}, {shape.params / 1e9:.2f}B parameters "
                  f"(largest layer {shape.largest_layer / 1e6:.1f}M), {shape.layers} layers, hidden {shape.hidden}")
    from branchout.core.graph import build_graph

    # the pretrain and every multi-worker fine-tune (a single-worker one runs without DeepSpeed)
    jobs = [(n.name, n.section, n.seq_len) for n in build_graph(spec).of(Kind.PRETRAIN, Kind.FINETUNE)
            if n.kind is Kind.PRETRAIN or n.workers > 1]
    for name, t, seq_len in jobs:
        memory = gpu_memory_gb or _gpu_memory(t)
        label = gpu_label or t.resources_per_worker.accelerator or (f"{memory:g} GB" if memory else None)
        precision = _precision_line(console, name, t, spec.cluster.address is None, gpu_label)
        if memory is None:
            console.print(f"{name}: no GPU type: pass --gpu or --gpu-mem, or set resources_per_worker.accelerator")
            continue
        options = memory_options(shape, t, seq_len, memory)
        best = pick(options)
        table = Table(title=f"{name}: {t.num_workers} × {label}, micro-batch {t.micro_batch_size} × {seq_len} "
                      f"tokens, {precision.used if precision else 'bf16 or fp16'}", title_justify="left")
        for col in ("setting", "model states", "activations", "total / GPU", "usable / GPU", "host / node", "fits"):
            table.add_column(col, justify="left" if col in ("setting", "fits") else "right")
        for e in options:
            mark = "[bold green]← pick[/]" if e is best else ("yes" if e.fits else "[red]no[/]")
            table.add_row(e.option.label, f"{e.model_states / GB:.1f} GB", f"{e.activations / GB:.1f} GB",
                          f"{e.total / GB:.1f} GB", f"{e.budget / GB:.1f} GB",
                          f"{e.cpu_per_node / GB:.0f} GB" if e.cpu_per_node else "-", mark)
        console.print(table)
        console.print(f"{name} pick: {best.option.label}" if best else
                      f"{name} pick: none fits; lower micro_batch_size or seq_len, or use bigger GPUs")
    _print_job_fits(console, spec, gpu_memory_gb, gpu_label)


def print_step_prediction(console: Console, spec, shape, gpu: str, step_s: float) -> None:
    """``branchout plan --step-s``: the pretrain's step on more GPUs, from one measured step.

    A prediction, and labelled one: the measured single-GPU step plus ZeRO's communication
    volume over ``gpu``'s nominal links (``cluster.interconnect``)."""
    from branchout.cluster.interconnect import links, predict_step

    t = spec.pretrain
    if links(gpu) is None:
        console.print(f"pretrain step on more GPUs: no link figures for {gpu!r}; nothing predicted")
        return
    width = 2 if t.deepspeed.precision in ("auto", "bf16", "fp16") else 4
    sizes = sorted({2, 8, 16, 64, t.num_workers} - {0, 1})
    table = Table(title=f"pretrain step on N × {gpu}, PREDICTED (not measured): {step_s:g} s measured on one GPU "
                  f"+ ZeRO's volume of {shape.params / 1e6:.0f}M {8 * width}-bit weights over nominal links",
                  title_justify="left")
    for col in ("GPUs", "setting", "sent / GPU / step", "communication", "step, overlapped", "step, not overlapped"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for n in sizes:
        for stage in (2, 3):
            p = predict_step(step_s, stage, shape.params, width, n, 8, gpu)
            table.add_row(str(n), f"ZeRO-{stage}", f"{p.volume / 1e9:.2f} GB", f"{p.comm_s:.3f} s",
                          f"{p.overlapped_s:.3f} s", f"{p.serial_s:.3f} s")
    console.print(table)
    console.print("  8 GPUs per node; beyond one node every ring runs at the network's pace. "
                  "Overlapped assumes overlap_comm hides the communication behind the step's compute.",
                  highlight=False)


def _precision_line(console: Console, name: str, t, embedded: bool, gpu_label: str | None):
    """``pretrain: precision auto → fp32 (CPU … has no AVX512-BF16 or AMX: …)``; returns the
    prediction (None where the workers decide). ``--gpu`` plans for that GPU type."""
    from branchout.core.precision import UNDECIDED, predict

    r = t.resources_per_worker
    named = gpu_label if gpu_label and not gpu_label.endswith("GiB") else None  # --gpu-mem names no type
    known = predict(t.deepspeed.precision, r.uses_gpu or bool(gpu_label), named or r.accelerator, embedded)
    console.print(f"{name}: precision {known.line() if known else UNDECIDED}", highlight=False, markup=False)
    if known and known.warning:
        console.print(f"warning: {name}: {known.warning}", highlight=False, markup=False)
    return known


def _print_job_fits(console: Console, spec, gpu_memory_gb: float | None, gpu_label: str | None) -> None:
    """Every fan-out and evaluation job: its GPU share, how many share a GPU, whether it fits."""
    from branchout.cluster.gpu_memory import GB, usable_bytes
    from branchout.orchestrator.config.plan import _gpu_memory, build_plan

    plan = build_plan(spec)
    domains = {d.name: d for d in spec.finetune.domains}
    table = Table(title=f"fan-out ({plan.fanout_jobs} jobs at once), then evaluation", title_justify="left")
    for col in ("job", "engine", "workers × resources", "memory / worker", "jobs / GPU", "budget / job", "fits"):
        table.add_column(col, justify="left" if col in ("job", "engine", "workers × resources", "fits") else "right")
    for job in plan.jobs:
        r = domains[job.domain].resources_per_worker
        memory = gpu_memory_gb or _gpu_memory(domains[job.domain])
        per_gpu = (int(1 / r.gpu + 1e-9) if r.gpu < 1 else 1) if r.uses_gpu else None
        budget = usable_bytes(memory) / per_gpu if per_gpu and memory else None
        fits = "-" if budget is None else "yes" if job.memory_bytes <= budget else "[red]no[/]"
        table.add_row(job.name, job.engine, f"{job.workers} × {_bundle(job.resources)}",
                      f"{job.memory_bytes / GB:.1f} GB", str(per_gpu or "-"),
                      f"{budget / GB:.1f} GB" if budget else "-", fits)
    console.print(table)
    _print_other_jobs(console, plan)
    if gpu_label and not any(domains[j.domain].resources_per_worker.uses_gpu for j in plan.jobs):
        console.print("fan-out and evaluation jobs run on CPUs (resources_per_worker.gpu: 0)")
