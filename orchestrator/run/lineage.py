"""Lineage: which data, tokenizer and parent checkpoint produced a model, and from which run.

The tree is built from a run's record alone: every job's outputs carry its cache key,
whether it was computed in this run or reused (``cached_from``), its model URI and, for
data jobs, the data fingerprint; every job lists its parents (the job graph's edges). A
fine-tune's parent is the pretrain of the same run record (which may itself have been
reused from an earlier run).

    data: general.jsonl fp 3f2a…, legal.jsonl fp 81c0…
    └── tokenizer      computed  key 9d1e…
        ├── pretrain   cached from run 20261125-0301…  key 44ab…  → …/pretrain/model
        │   ├── finetune/legal  computed  key …  → …/finetune/legal/model
        │   │   └── evaluate/legal  base 382.4 → fine-tuned 50.5
        ...
"""

from __future__ import annotations

import io
import time

from rich.console import Console
from rich.tree import Tree

from branchout.core.graph import Kind
from branchout.orchestrator.run.state import JobRecord, RunRecord


def _how(rec: JobRecord) -> str:
    key = rec.outputs.get("key", "")
    origin = rec.outputs.get("cached_from")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.ended)) if rec.ended else "-"
    how = f"[blue]cached[/] from run {origin}" if origin else f"[green]{rec.state.value}[/] {when}"
    return f"{how}  key {key[:12]}" if key else how


def _label(name: str, rec: JobRecord) -> str:
    text = f"[bold]{name}[/]  {_how(rec)}"
    uri = rec.outputs.get("model_uri")
    if uri:
        text += f"  → {uri}"
    scores = [f"{m} {rec.outputs[f'{m}_ppl']:.1f}" for m in ("base", "finetuned", "scratch")
              if isinstance(rec.outputs.get(f"{m}_ppl"), float)]  # an evaluation's
    if scores:
        text += "  ppl: " + ", ".join(scores)
    if rec.error:
        text += f"  [red]{rec.error}[/]"
    return text


def lineage_tree(record: RunRecord, focus: str | None = None) -> Tree:
    """The run's tree; with ``focus`` (a job name) only that job's ancestors and descendants.

    Its shape is the job graph the run was created with (each job's ``parents``, recorded
    from ``core.graph``): a job is drawn under its first parent that is not a data job, and
    the data jobs are listed on the first line with their fingerprints.
    """
    jobs = record.jobs

    def drawn_under(name: str) -> str | None:
        return next((p for p in jobs[name].parents if p in jobs and jobs[p].kind != Kind.DATA), None)

    wanted = set(jobs)
    if focus is not None:
        wanted = {focus} | _related(record, focus, up=True) | _related(record, focus, up=False)
    data = [f"{rec.domain} fp {rec.outputs.get('fingerprint', '?')[:12]}"
            for name, rec in jobs.items() if rec.kind == Kind.DATA and name in wanted]
    root = Tree(f"run [bold]{record.run_id}[/] of {record.pipeline} ({record.state.value})  "
                f"data: {', '.join(data) or '-'}")
    branches: dict[str, Tree] = {}
    for name, rec in jobs.items():  # parents before children: the record keeps the graph's order
        if rec.kind == Kind.DATA or name not in wanted:
            continue
        under = drawn_under(name)
        while under is not None and under not in wanted:  # a focus hides some ancestors
            under = drawn_under(under)
        branches[name] = branches.get(under, root).add(_label(name, rec))
    return root


def _related(record: RunRecord, name: str, up: bool) -> set[str]:
    """Every ancestor (``up``) or descendant of ``name`` in the run's recorded graph."""
    edges = {n: set(rec.parents) for n, rec in record.jobs.items()} if up else \
        {n: {c for c, rec in record.jobs.items() if n in rec.parents} for n in record.jobs}
    out, todo = set(), [name]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in out:
                out.add(nxt)
                todo.append(nxt)
    return out


def lineage_text(record: RunRecord) -> str:
    """The tree as plain text (for report.md)."""
    console = Console(width=160, file=io.StringIO(), color_system=None)
    console.print(lineage_tree(record))
    return console.file.getvalue()


def find_job(record: RunRecord, path: str) -> str | None:
    """The job whose model directory ``path`` is (or is inside)."""
    for name, rec in record.jobs.items():
        uri = rec.outputs.get("model_uri")
        if uri and (path.rstrip("/") == uri.rstrip("/") or path.startswith(uri.rstrip("/") + "/")):
            return name
    return None
