"""The run report: ``report.md`` and ``report.html`` with the perplexity table and plots.

The table puts base, fine-tuned and from-scratch perplexity side by side per domain and
states the transfer gain (1 − finetuned / base). Loss curves come from the metrics
JSONL every job writes; PNGs are stored under ``eval/`` and embedded in the HTML
(base64) so the HTML is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from branchout.orchestrator.run.lineage import lineage_text
from branchout.orchestrator.run.state import RunRecord
from branchout.stages import storage
from branchout.stages.metrics import read_metrics


def write_report(record: RunRecord, metrics: dict[str, Any]) -> str:
    """Write both reports into the run directory; returns the HTML report's URI."""
    plots = {"loss_curves.png": _loss_plot(record), "perplexity.png": _ppl_plot(metrics)}
    plots = {k: v for k, v in plots.items() if v}
    for name, png in plots.items():
        storage.write_bytes(storage.join(record.run_uri, "eval", name), png)
    rows = _rows(record, metrics)
    storage.write_text(storage.join(record.run_uri, "report.md"), _markdown(record, rows, plots))
    uri = storage.join(record.run_uri, "report.html")
    storage.write_text(uri, _html(record, rows, plots))
    return uri


def _fmt(v: Any, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, int | float) else "—"


def _rows(record: RunRecord, metrics: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, m in metrics.get("domains", {}).items():
        state = record.job(f"finetune/{name}").state.value
        rows.append([name, m.get("method", ""), state, _fmt(m.get("base_ppl")), _fmt(m.get("finetuned_ppl")),
                     _fmt(m.get("scratch_ppl")), _fmt(m.get("transfer_gain"), ".1%"),
                     _fmt(m.get("gain_vs_scratch"), ".1%"), _fmt(m.get("heldout_tokens"), ",")])
    return rows


HEADER = ["domain", "method", "fine-tune", "base ppl", "fine-tuned ppl", "scratch ppl",
          "transfer gain (vs base)", "gain vs scratch", "held-out tokens"]


def _summary(record: RunRecord) -> list[str]:
    pre = record.job("pretrain")
    seconds = (record.ended or 0) - (record.started or 0)
    return [
        f"Run `{record.run_id}` of pipeline `{record.pipeline}`: **{record.state.value}**"
        + (f" ({record.error})" if record.error else "") + f", {seconds:.0f} s.",
        f"Pretrain: final loss {_fmt(pre.outputs.get('final_loss'), '.3f')}, "
        f"{_fmt(pre.outputs.get('tokens_per_s'), ',.0f')} tokens/s.",
        "Transfer gain = 1 − fine-tuned ppl / base ppl: how much the domain fine-tune improved on "
        "the shared base. Gain vs scratch compares with the same architecture trained for the same "
        "budget on the domain data alone.",
    ]


def _markdown(record: RunRecord, rows: list[list[str]], plots: dict[str, bytes]) -> str:
    lines = [f"# branchout report: {record.pipeline}", "", *_summary(record), "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    lines += [f"![{name}](eval/{name})" for name in plots]
    lines += ["", "## Lineage", "", "```", lineage_text(record).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _html(record: RunRecord, rows: list[list[str]], plots: dict[str, bytes]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    imgs = "".join(f'<h2>{esc(n)}</h2><img alt="{esc(n)}" src="data:image/png;base64,'
                   f'{base64.b64encode(p).decode()}">' for n, p in plots.items())
    summary = "".join(f"<p>{esc(s).replace('**', '')}</p>" for s in _summary(record))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(record.pipeline)}</title>"
            "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
            "td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
            "td:first-child,th:first-child{text-align:left}</style></head><body>"
            f"<h1>branchout report: {esc(record.pipeline)}</h1>{summary}"
            f"<table><tr>{head}</tr>{body}</table>{imgs}"
            f"<h2>Lineage</h2><pre>{esc(lineage_text(record))}</pre></body></html>")


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _loss_plot(record: RunRecord) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name in ["pretrain", *[n for n in record.jobs if n.split("/")[0] in ("finetune", "scratch")]]:
        points = {r["step"]: r["loss"] for r in read_metrics(_logs_of(record, name), name) if "loss" in r}
        if points:  # a resumed job logs some steps twice; the later value wins
            series[name] = sorted(points.items())
    if not series:
        return None
    fig, (ax_pre, ax_ft) = plt.subplots(1, 2, figsize=(12, 4))
    for name, pts in series.items():
        ax = ax_pre if name == "pretrain" else ax_ft
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name,
                linestyle="--" if name.startswith("scratch") else "-")
    ax_pre.set_title("pretrain loss")
    ax_ft.set_title("fine-tune (solid) and from-scratch (dashed) loss")
    for ax in (ax_pre, ax_ft):
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if ax.lines:
            ax.legend(fontsize=7)
    return _figure_png(fig)


def _logs_of(record: RunRecord, job: str) -> str:
    """A cached job's curves are in the logs of the run that computed it."""
    origin = record.job(job).outputs.get("cached_from")
    run_uri = record.run_uri if not origin else storage.join(record.run_uri.rsplit("/", 1)[0], origin)
    return storage.join(run_uri, "logs")


def _ppl_plot(metrics: dict[str, Any]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = metrics.get("domains", {})
    if not domains:
        return None
    kinds = [k for k in ("base", "finetuned", "scratch") if any(f"{k}_ppl" in m for m in domains.values())]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        values = [domains[d].get(f"{kind}_ppl", 0) for d in domains]
        ax.bar([x + i * width for x in range(len(domains))], values, width, label=kind)
    ax.set_xticks([x + width * (len(kinds) - 1) / 2 for x in range(len(domains))], list(domains))
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log)")
    ax.legend()
    return _figure_png(fig)
