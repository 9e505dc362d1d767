"""Lineage: which data, tokenizer and parent checkpoint produced a model, and from which run.

The tree is built from a run's record alone: every job's outputs carry its cache key,
whether it was computed in this run or reused (``cached_from``), its model URI and, for
data jobs, the data fingerprint. A fine-tune's parent is the pretrain of the same run
record (which may itself have been reused from an earlier run).

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
    if name.startswith("evaluate/"):
        parts = [f"{m} {rec.outputs[f'{m}_ppl']:.1f}" for m in ("base", "finetuned", "scratch")
                 if isinstance(rec.outputs.get(f"{m}_ppl"), float)]
        text += "  ppl: " + ", ".join(parts) if parts else ""
    if rec.error:
        text += f"  [red]{rec.error}[/]"
    return text


def lineage_tree(record: RunRecord, focus: str | None = None) -> Tree:
    """The run's tree; with ``focus`` (a job name) only that job's ancestors and descendants."""
    stages = record.jobs
    domains = [n.split("/", 1)[1] for n in stages if n.startswith("finetune/")]

    def wanted(name: str) -> bool:
        if focus is None:
            return True
        domain = focus.split("/", 1)[1] if "/" in focus else None
        chain = {"tokenizer", "data/pretrain", "pretrain"} | ({f"data/{domain}"} if domain else set())
        below = {focus} | ({f"evaluate/{domain}"} if domain else set())
        if focus == "pretrain":
            below |= {n for n in stages if n.startswith(("finetune/", "evaluate/"))}
        return name in chain or name in below

    data = [f"{n.split('/', 1)[1]} fp {stages[n].outputs.get('fingerprint', '?')[:12]}"
            for n in stages if n.startswith("data/") and wanted(n)]
    root = Tree(f"run [bold]{record.run_id}[/] of {record.pipeline} ({record.state.value})  "
                f"data: {', '.join(data) or '-'}")
    tok = root.add(_label("tokenizer", stages["tokenizer"])) if "tokenizer" in stages else root
    pre = tok.add(_label("pretrain", stages["pretrain"])) if "pretrain" in stages and wanted("pretrain") else tok
    for d in domains:
        if wanted(f"finetune/{d}"):
            ft = pre.add(_label(f"finetune/{d}", stages[f"finetune/{d}"]))
            if f"evaluate/{d}" in stages and wanted(f"evaluate/{d}"):
                ft.add(_label(f"evaluate/{d}", stages[f"evaluate/{d}"]))
        if f"scratch/{d}" in stages and wanted(f"scratch/{d}"):
            tok.add(_label(f"scratch/{d}", stages[f"scratch/{d}"]))
    return root


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
