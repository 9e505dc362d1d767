"""The report's plots, each a PNG (or None when there is nothing to draw): training loss per
step, held-out loss during training, probe forecasts, perplexity per domain, and the cross
heatmap of every model on every held-out set. ``orchestrator.run.report`` stores and embeds them.
"""

from __future__ import annotations

import io
import math
from typing import Any

from branchout import storage
from branchout.core.graph import Kind
from branchout.orchestrator.run.state import RunRecord
from branchout.stages.training.metrics import read_metrics


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def loss_plot(record: RunRecord) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    trained = (Kind.PRETRAIN, Kind.FINETUNE, Kind.SCRATCH)
    for name in [n for n, job in record.jobs.items() if job.kind in trained]:
        points = {r["step"]: r["loss"] for r in read_metrics(_logs_of(record, name), name) if "loss" in r}
        if points:  # a resumed job logs some steps twice; the later value wins
            series[name] = sorted(points.items())
    if not series:
        return None
    fig, (ax_pre, ax_ft) = plt.subplots(1, 2, figsize=(12, 4))
    for name, pts in series.items():
        ax = ax_pre if name == "pretrain" else ax_ft
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name,
                linestyle="--" if record.jobs[name].kind == Kind.SCRATCH else "-")
    ax_pre.set_title("pretrain loss")
    ax_ft.set_title("fine-tune (solid) and from-scratch (dashed) loss")
    for ax in (ax_pre, ax_ft):
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if ax.lines:  # beside the axes: a legend never covers a curve
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _figure_png(fig)


def heldout_plot(record: RunRecord) -> bytes | None:
    """``eval_every``'s curves: each trained job's held-out loss (a mixture's sources dotted),
    the step a fine-tune exported marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[str, list]] = {}
    trained = (Kind.PRETRAIN, Kind.FINETUNE, Kind.SCRATCH)
    for name in [n for n, job in record.jobs.items() if job.kind in trained]:
        for r in read_metrics(_logs_of(record, name), name):
            for key, value in r.items():
                if key.startswith("eval_loss"):
                    label = name + key.removeprefix("eval_loss").replace("/", ": ", 1)
                    curves.setdefault(name, {}).setdefault(label, []).append((r["step"], value))
    if not curves:
        return None
    panels = [group for group in ([n for n in curves if n == "pretrain"], [n for n in curves if n != "pretrain"])
              if group]  # the pretrain's steps and the fine-tunes' are different scales
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False, layout="constrained")
    for ax, names in zip(axes[0], panels, strict=True):
        _heldout_panel(ax, record, {n: curves[n] for n in names})
    return _figure_png(fig)


def _heldout_panel(ax, record: RunRecord, curves: dict[str, dict[str, list]]) -> None:
    for name, series in curves.items():
        for label, pts in series.items():
            pts = sorted(dict(pts).items())  # a resumed job scores some steps twice; the later wins
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker=".",
                            linestyle=":" if label != name else "-")
            exported = record.jobs[name].outputs.get("exported_step")
            if label == name and exported in dict(pts):
                ax.plot([exported], [dict(pts)[exported]], marker="*", markersize=12, color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (log perplexity)")
    ax.set_title("pretrain" if list(curves) == ["pretrain"] else "fine-tunes and baselines; * the step exported")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))


def forecast_plot(forecast: dict | None) -> bytes | None:
    """Per domain: the probe losses against pretraining tokens, the fitted law and the
    bootstrap interval of its value at the end of the budget."""
    if not forecast or not forecast.get("domains"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    domains = forecast["domains"]
    fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.6), squeeze=False, layout="constrained")
    budget = forecast["budget_tokens"]
    for ax, (domain, f) in zip(axes[0], domains.items(), strict=True):
        ax.plot(f["tokens"], f["losses"], "o", label="probe")
        if f.get("E") is not None:
            t = np.geomspace(max(1, f.get("fitted_from") or min(f["tokens"])), budget, 100)  # the law's regime on
            ax.plot(t, f["E"] + f["A"] * t ** -f["alpha"], "-", label="fit" + ("" if f["verdict"] == "forecast"
                                                                                   else " (no forecast)"))
            if f.get("interval"):
                lo, hi = f["interval"]
                ax.errorbar([budget], [f["final_loss"]], yerr=[[f["final_loss"] - lo], [hi - f["final_loss"]]],
                            fmt="s", capsize=4, label="at the budget")
        ax.set_xscale("log")
        ax.set_title(domain)
        ax.set_xlabel("pretraining tokens")
        ax.set_ylabel("probe held-out loss")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: never over a point
    return _figure_png(fig)


def _logs_of(record: RunRecord, job: str) -> str:
    """A cached job's curves are in the logs of the run that computed it."""
    origin = record.job(job).outputs.get("cached_from")
    run_uri = record.run_uri if not origin else storage.join(record.run_uri.rsplit("/", 1)[0], origin)
    return storage.join(run_uri, "logs")


def ppl_plot(metrics: dict[str, Any]) -> bytes | None:
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
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return _figure_png(fig)


def cross_plot(metrics: dict[str, Any]) -> bytes | None:
    """``evaluate.cross``: a heatmap of model × held-out set, each cell its perplexity."""
    cross = metrics.get("cross") or {}
    if not cross:
        return None

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(cross)
    sets = list(dict.fromkeys(s for row in cross.values() for s in row))
    values = [[cross[m].get(s, math.nan) for s in sets] for m in models]
    fig, ax = plt.subplots(figsize=(1.3 * len(sets) + 3, 0.45 * len(models) + 1.5))
    image = ax.imshow([[math.log(v) if v == v else math.nan for v in row] for row in values], cmap="viridis_r",
                      aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:  # dark text on the light (low) cells, light on the dark
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if image.norm(math.log(v)) > 0.5 else "black")
    ax.set_xticks(range(len(sets)), sets)
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("held-out set")
    fig.colorbar(image, ax=ax, label="log perplexity (lower is better)")
    return _figure_png(fig)
