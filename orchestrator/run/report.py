"""The run report: ``report.md`` and ``report.html`` with the evaluation table and plots.

The table puts base, fine-tuned and from-scratch perplexity side by side per domain and
states the transfer gain (1 − finetuned / base); instruction domains add exact match and
ROUGE-L of the models' greedy answers. *Findings* say plainly where a fine-tune came out
worse than from-scratch or the base, and what to change, and (``evaluate.cross``) which
fine-tunes forgot the general text; a heatmap shows every model on every held-out set. A few
generation samples per domain (the same prompts for every model) follow. Loss curves come from the metrics
JSONL every job writes; PNGs are stored under ``eval/`` and embedded in the HTML
(base64) so the HTML is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import json
import math
from typing import Any

from branchout import storage
from branchout.core.graph import JobGraph, Kind, corpora
from branchout.orchestrator.run.lineage import lineage_text
from branchout.orchestrator.run.plots import (
    cross_plot,
    forecast_plot,
    heldout_plot,
    loss_plot,
    ppl_plot,
)
from branchout.orchestrator.run.state import RunRecord


def metrics_row(r: dict[str, Any], method: str, data_kind: str) -> dict[str, Any]:
    """One domain's row of ``eval/metrics.json`` from its evaluation job's outputs.

    ``exact_match`` and ``rouge_l`` (instruction domains) map each scored model to its score,
    ``exact_match_ci`` to its 95% interval; ``majority`` is the leave-one-out majority answer's
    exact match, interval and most given answer, over ``questions`` prompts.
    """
    row: dict[str, Any] = {f"{m}_ppl": r[f"{m}_ppl"] for m in MODELS if f"{m}_ppl" in r}
    if "heldout_tokens" in r:
        row["heldout_tokens"] = r["heldout_tokens"]
    if "base_ppl" in row and "finetuned_ppl" in row:
        row["transfer_gain"] = 1 - row["finetuned_ppl"] / row["base_ppl"]
    if "scratch_ppl" in row and "finetuned_ppl" in row:
        row["gain_vs_scratch"] = 1 - row["finetuned_ppl"] / row["scratch_ppl"]
    for metric in ("exact_match", "exact_match_ci", "rouge_l"):
        scores = {m: r[f"{m}_{metric}"] for m in MODELS if f"{m}_{metric}" in r}
        if scores:
            row[metric] = scores
    if "majority_exact_match" in r:
        row["questions"] = r["questions"]
        row["majority"] = {"exact_match": r["majority_exact_match"], "exact_match_ci": r["majority_exact_match_ci"],
                           "answer": r["majority_answer"]}
    row["method"] = method
    row["data"] = "instruction" if data_kind == "instruct" else "text"
    if isinstance(r.get("precision"), dict):
        row["scored_in"] = r["precision"].get("used")
    return row


def cross_matrix(graph: JobGraph, record: RunRecord, evaluations: dict[str, dict]) -> dict[str, dict[str, float]]:
    """``evaluate.cross``: model → held-out set → perplexity. A model is named by the job that
    made it (``finetune/legal``; the base ``base``), a set by its dataset (``general``: the
    pretraining corpus's). Own-domain scores are the evaluation jobs' (``evaluations``: their
    outputs by job name), the rest the cross jobs'."""
    out: dict[str, dict[str, float]] = {}
    for node in graph.of(Kind.EVALUATE):
        r = evaluations.get(node.name) or {}
        for role, producer in node.parents.items():
            if f"{role}_ppl" in r:
                out.setdefault("base" if role == "base" else producer, {})[node.domain] = r[f"{role}_ppl"]
    for node in graph.of(Kind.CROSS):
        for model, sets in record.job(node.name).outputs.get("ppl", {}).items():
            out.setdefault(model, {}).update(sets)
    sources = corpora(graph.spec.pretrain)
    if len(sources) > 1:  # a mixture: "general" is its sources' perplexities, weighted as trained
        for row in out.values():
            if all(c.heldout_set in row for c in sources):
                row["general"] = math.exp(sum(c.weight * math.log(row[c.heldout_set]) for c in sources))
    order = ["base", *(n.name for n in graph.of(Kind.FINETUNE, Kind.SCRATCH))]
    sets = ["general", *(c.heldout_set for c in sources if len(sources) > 1), *graph.domains]
    return {m: {s: out[m][s] for s in sets if s in out[m]} for m in order if m in out}


def forgetting(cross: dict[str, dict[str, float]], fine_tunes: list[str], threshold: float) -> dict[str, Any]:
    """Each fine-tune's general-text perplexity over the base's, and those above 1 + ``threshold``."""
    base = cross.get("base", {}).get("general")
    ratios = {m: cross[m]["general"] / base for m in fine_tunes if base and "general" in cross.get(m, {})}
    return {"threshold": threshold, "general_ppl_vs_base": ratios,
            "forgot": [m for m, r in ratios.items() if r > 1 + threshold]}


def precisions(record: RunRecord) -> dict[str, dict]:
    """Job → the precision its workers decided (``core.precision.Precision`` as a dict)."""
    return {name: job.outputs["precision"] for name, job in record.jobs.items()
            if isinstance(job.outputs.get("precision"), dict)}


PRECISION_HEADER = ["job", "precision", "set to", "why"]
PRECISION_NOTE = ("`precision: auto` is decided where each job runs: bf16 on hardware that does it "
                  "natively, fp32 on CPUs that would emulate it, fp16 on GPUs without bf16.")


def precision_rows(record: RunRecord) -> list[list[str]]:
    """What each training and evaluation job computed in, and why (``precision: auto``)."""
    return [[name, p.get("used", "?"), p.get("requested", "?"),
             p.get("reason", "") + (f". Warning: {p['warning']}" if p.get("warning") else "")]
            for name, p in precisions(record).items()]


def read_run_metrics(record: RunRecord) -> dict | None:
    """The run's ``eval/metrics.json``, or None before any evaluation wrote it."""
    uri = storage.join(record.run_uri, "eval", "metrics.json")
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


# each plot's file under eval/ and the heading that says what it shows
PLOTS = {"loss_curves.png": "Training loss per step", "heldout_curves.png": "Held-out loss during training",
         "forecast.png": "Probe loss against pretraining tokens, and its forecast",
         "perplexity.png": "Held-out perplexity per domain", "cross.png": "Perplexity of every model on every held-out set"}


def write_report(record: RunRecord, metrics: dict[str, Any]) -> str:
    """Write both reports into the run directory; returns the HTML report's URI."""
    forecast_uri = storage.join(record.run_uri, "eval", "forecast.json")
    forecast = json.loads(storage.read_text(forecast_uri)) if storage.exists(forecast_uri) else None
    plots = {"loss_curves.png": loss_plot(record), "heldout_curves.png": heldout_plot(record),
             "forecast.png": forecast_plot(forecast),
             "perplexity.png": ppl_plot(metrics),
             "cross.png": cross_plot(metrics)}
    plots = {k: v for k, v in plots.items() if v}
    for name, png in plots.items():
        storage.write_bytes(storage.join(record.run_uri, "eval", name), png)
    rows = _rows(record, metrics)
    samples_uri = storage.join(record.run_uri, "eval", "samples.json")
    samples = json.loads(storage.read_text(samples_uri)) if storage.exists(samples_uri) else {}
    notes = [("Worse than a baseline.", n) for n in findings(metrics)] + \
        [("Answers no better than a baseline.", n) for n in answer_findings(metrics)] + \
        [("Forgot the general text.", n) for n in forgetting_findings(metrics)]
    harness = harness_rows(metrics)
    answers = answer_rows(metrics)
    probes = forecast_rows(forecast)
    storage.write_text(storage.join(record.run_uri, "report.md"),
                       _markdown(record, rows, plots, notes, samples, harness, probes, answers))
    uri = storage.join(record.run_uri, "report.html")
    storage.write_text(uri, _html(record, rows, plots, notes, samples, harness, probes, answers))
    return uri


def _fmt(v: Any, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, int | float) else "—"


def _rows(record: RunRecord, metrics: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, m in metrics.get("domains", {}).items():
        state = record.domain_job(Kind.FINETUNE, name).state.value
        rows.append([name, m.get("method", ""), state, _fmt(m.get("base_ppl")), _fmt(m.get("finetuned_ppl")),
                     _fmt(m.get("scratch_ppl")), _fmt(m.get("transfer_gain"), ".1%"),
                     _fmt(m.get("gain_vs_scratch"), ".1%"), _fmt(m.get("heldout_tokens"), ","),
                     _scores(m.get("exact_match")), _scores(m.get("rouge_l"))])
    return rows


def _scores(scores: dict[str, float] | None) -> str:
    """``base / fine-tuned / scratch`` of one answer metric, as percentages."""
    if not scores:
        return "—"
    return " / ".join(_fmt(scores.get(m), ".0%") for m in MODELS if m in scores)


MODELS = ("base", "finetuned", "scratch")
HEADER = ["domain", "method", "fine-tune", "base ppl", "fine-tuned ppl", "scratch ppl",
          "transfer gain (vs base)", "gain vs scratch", "held-out tokens",
          "exact match (base / ft / scratch)", "ROUGE-L (base / ft / scratch)"]


def findings(metrics: dict[str, Any]) -> list[str]:
    """One plain sentence per domain whose fine-tune is worse than from-scratch or the base
    (held-out perplexity higher, or ROUGE-L of its answers lower), with what to change."""
    out = []
    for name, m in metrics.get("domains", {}).items():
        worse = []
        for other in ("base", "scratch"):
            ft, them = m.get("finetuned_ppl"), m.get(f"{other}_ppl")
            if isinstance(ft, int | float) and isinstance(them, int | float) and ft > them:
                worse.append((other, f"held-out perplexity {ft:.2f} vs {_OF[other]} {them:.2f}"))
            rouge = m.get("rouge_l") or {}
            if "finetuned" in rouge and other in rouge and rouge["finetuned"] < rouge[other]:
                worse.append((other, f"ROUGE-L {rouge['finetuned']:.0%} vs {_OF[other]} {rouge[other]:.0%}"))
        if not worse:
            continue
        than = " and ".join(dict.fromkeys(_OF[o].removesuffix("'s") for o, _ in worse))
        out.append(f"{name}: the fine-tune is worse than {than} ({'; '.join(why for _, why in worse)}). "
                   f"Try: {_advice({o for o, _ in worse}, m.get('method'))}.")
    return out


def forgetting_findings(metrics: dict[str, Any]) -> list[str]:
    """One sentence per fine-tune whose general-text perplexity rose past ``evaluate.forgetting``."""
    f = metrics.get("forgetting") or {}
    general = {m: row.get("general") for m, row in (metrics.get("cross") or {}).items()}
    return [f"{m}: general-text perplexity {general[m]:.2f} vs the base's {general['base']:.2f} "
            f"({f['general_ppl_vs_base'][m] - 1:+.0%}, more than evaluate.forgetting = {f['threshold']:.0%}). "
            "Try: fewer steps or a lower learning rate, or LoRA instead of a full fine-tune."
            for m in f.get("forgot", [])]


_OF = {"base": "the base model's", "scratch": "the from-scratch model's"}


def _advice(worse_than: set[str], method: str | None) -> str:
    tips = []
    if worse_than == {"base", "scratch"}:
        # lost what the base knew without learning the domain: the updates are too big
        tips.append("a lower learning rate (optimizer.lr)")
    elif "base" in worse_than:
        tips.append("a lower learning rate (optimizer.lr) or fewer steps, so it keeps what the base knew")
    else:
        tips.append("more fine-tune steps (a from-scratch model trained as long beat it)")
    if method == "lora":
        tips.append("a higher LoRA rank (lora.rank) or method: full")
    tips.append("more domain data")
    return "; ".join(tips)


SPLIT_HEADER = ["dataset", "training docs", "held-out docs scored",
                "moved to training: near-duplicates of training text", "not scored: mostly pretraining text"]


def split_rows(record: RunRecord) -> list[list[str]]:
    """What decontamination did to each dataset's held-out split (from its data job)."""
    rows = []
    for name, job in record.of_kind("data").items():
        out = job.outputs
        if "heldout_docs" not in out:
            continue
        rows.append([name, _fmt(out.get("train_docs"), ","), _fmt(out.get("heldout_docs"), ","),
                     _fmt(out.get("heldout_moved_near_duplicates", 0), ","),
                     _fmt(out.get("heldout_dropped_pretraining_overlap", 0), ",")])
    return rows


SPLIT_NOTE = ("Held-out documents that are near-duplicates of a training document (most of their "
              "sampled 8-token shingles occur in training text) are moved to training, so a score "
              "never rewards memorised boilerplate; a domain's held-out documents that are mostly "
              "pretraining text are not scored either.")


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
        "budget on the domain data alone. Instruction domains score perplexity on answer tokens only, "
        "and exact match / ROUGE-L of each model's greedy answers to held-out prompts.",
        *farm_lines(record),
    ]


def farm_lines(record: RunRecord) -> list[str]:
    """Which fine-tunes trained together in an adapter farm (one base, one process), by farm."""
    farms: dict[str, list[str]] = {}
    for name, job in record.jobs.items():
        if job.outputs.get("farm"):
            farms.setdefault(job.outputs["farm"], []).append(name)
    return [f"Adapter farm {farm}: {', '.join(names)} trained together on one copy of the base "
            "(each its own job: optimizer, schedule, checkpoints)." for farm, names in farms.items()]


def job_warnings(record: RunRecord) -> list[str]:
    """What workers warned of during the run (a damaged checkpoint skipped on resume), by job."""
    return [f"{name}: {w}" for name, job in record.jobs.items() for w in job.outputs.get("warnings", [])]


HARNESS_NOTE = ("`evaluate.lm_eval`: EleutherAI's lm-evaluation-harness on each model, beside perplexity "
                "(a LoRA fine-tune merged into its base). Its full results: `lm_eval/<model>/results.json`.")
HARNESS_HEADER = ["model", "task", "metric", "value"]
FORECAST_NOTE = ("`pretrain.probes`: each domain fine-tuned briefly from the pretrain at its probe points; the "
                 "probe's held-out loss fit as E + A·T^-α against pretraining tokens T, from the curve's steepest fall "
                 "per doubling on (before it, the probes show the fine-tune more than the pretrain). \"forecast at "
                 "half\": what the "
                 "probes up to half the budget said the last probe would score; \"last probe\": what it scored.")
FORECAST_HEADER = ["domain", "probe points", "E", "α", "forecast at half", "last probe", "verdict"]


def forecast_rows(forecast: dict | None) -> list[list[str]]:
    if not forecast:
        return []
    half = forecast["budget_tokens"] / 2 / forecast["tokens_per_step"]
    rows = []
    for domain, f in forecast["domains"].items():
        early = [h for h in f["forecast_after"] if h["step"] <= half and h["verdict"] == "forecast"]
        fitted = f.get("fitted_from")  # the law's regime: the points from the curve's steepest fall on
        points = str(len(f["tokens"])) + (f", fit from step {fitted // forecast['tokens_per_step']:,}"
                                          if fitted and fitted > min(f["tokens"]) else "")
        rows.append([domain, points, _num(f.get("E")), _num(f.get("alpha")),
                     _num(early[-1]["final_loss"]) if early else "-", _num(f["losses"][-1]) if f["losses"] else "-",
                     f["verdict"] + (f" ({f['why']})" if f.get("why") else "")])
    stop = forecast.get("stop") or {}
    if stop.get("stopped_at"):
        rows.append(["(pretrain)", "", "", "", "", "", f"stopped at step {stop['stopped_at']}: {stop['why']}"])
    return rows


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}"


ANSWER_HEADER = ["domain", "questions", "answered by", "exact match", "95% interval", "fine-tune vs it"]
ANSWER_NOTE = ("Exact match of greedy answers to held-out questions, with its 95% Wilson interval. The majority "
               "answer gives each question the answer most common among the other held-out questions: a model "
               "that learned the task must beat it. \"beats\" means higher with the intervals apart; \"within "
               "noise\" higher but overlapping (more questions: evaluate.generation_samples).")


def answer_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Per instruction domain: each model's exact match and interval, the majority answer's,
    and how the fine-tune compares with each."""
    rows = []
    for name, m in metrics.get("domains", {}).items():
        if "majority" not in m or "finetuned" not in (m.get("exact_match") or {}):
            continue
        scored = {model: (m["exact_match"][model], m["exact_match_ci"][model])
                  for model in MODELS if model in m["exact_match"]}
        scored["majority answer"] = (m["majority"]["exact_match"], m["majority"]["exact_match_ci"])
        ft, ft_ci = scored["finetuned"]
        for who, (em, ci) in scored.items():
            rows.append([name, str(m["questions"]), who if who != "majority answer" else
                         f"majority answer (mostly `{_inline(m['majority']['answer'])}`)", f"{em:.1%}",
                         f"{ci[0]:.1%}-{ci[1]:.1%}", "" if who == "finetuned" else _versus(ft, ft_ci, em, ci)])
    return rows


def _versus(ft: float, ft_ci: list[float], other: float, other_ci: list[float]) -> str:
    if ft > other and ft_ci[0] > other_ci[1]:
        return "beats"
    if ft > other:
        return "higher, within noise"
    return "does not beat"


def answer_findings(metrics: dict[str, Any]) -> list[str]:
    """One sentence per instruction domain whose fine-tune does not beat the from-scratch model
    or the majority answer beyond noise."""
    rows = answer_rows(metrics)
    fine_tuned = {r[0]: r[3] for r in rows if r[2] == "finetuned"}
    out = []
    for domain, questions, who, em, _, verdict in rows:
        if who in ("finetuned", "base") or verdict == "beats":
            continue
        them = "the from-scratch model's" if who == "scratch" else "the majority answer's"
        how = "is above but within noise of" if verdict.startswith("higher") else "is not above"
        out.append(f"{domain}: the fine-tune's exact match {how} {them} ({fine_tuned[domain]} vs {em}, "
                   f"{questions} questions). Try: more fine-tune steps or data; more questions "
                   "(evaluate.generation_samples) to tell them apart.")
    return out


def harness_rows(metrics: dict[str, Any]) -> list[list[str]]:
    return [[model, task, metric, f"{value:.4f}"] for model, tasks in (metrics.get("lm_eval") or {}).items()
            for task, values in tasks.items() for metric, value in values.items()]


def _markdown(record: RunRecord, rows: list[list[str]], plots: dict[str, bytes], notes: list[tuple[str, str]],
              samples: dict[str, list[dict]], harness: list[list[str]] = (), probes: list[list[str]] = (),
              answers: list[list[str]] = ()) -> str:
    lines = [f"# branchout report: {record.pipeline}", "", *_summary(record), "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    if notes:
        lines += ["## Findings", ""] + [f"- **{kind}** {n}" for kind, n in notes] + [""]
    if job_warnings(record):
        lines += ["## Warnings", ""] + [f"- {w}" for w in job_warnings(record)] + [""]
    lines += _section_md("Answers", ANSWER_NOTE, ANSWER_HEADER, list(answers))
    lines += _section_md("Held-out split", SPLIT_NOTE, SPLIT_HEADER, split_rows(record))
    lines += _section_md("Precision", PRECISION_NOTE, PRECISION_HEADER, precision_rows(record))
    lines += _section_md("Benchmarks (lm-evaluation-harness)", HARNESS_NOTE, HARNESS_HEADER, list(harness))
    lines += _section_md("Probe forecasts", FORECAST_NOTE, FORECAST_HEADER, list(probes))
    for name in plots:
        lines += [f"## {PLOTS[name]}", "", f"![{PLOTS[name]}](eval/{name})", ""]
    if samples:
        lines += ["", "## Generation samples", "",
                  "Greedy answers of each model to the same held-out prompts (instruction domains), or "
                  "continuations of the same held-out text (plain-text domains)."]
        for domain, items in samples.items():
            lines += ["", f"### {domain}"]
            for i, sample in enumerate(items, 1):
                lines += ["", f"{i}. prompt: `{_inline(sample['prompt'])}`",
                          f"   - reference: `{_inline(sample['reference'])}`"]
                lines += [f"   - {model}: `{_inline(answer)}`" for model, answer in sample["answers"].items()]
    lines += ["", "## Lineage", "", "```", lineage_text(record).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _inline(text: str) -> str:
    """One line of Markdown code: newlines shown as ⏎, backticks that would end it replaced."""
    return text.replace("\n", " ⏎ ").replace("`", "'") if text.strip() else "(empty)"


def _samples_html(samples: dict[str, list[dict]]) -> str:
    esc = html.escape
    parts = []
    for domain, items in samples.items():
        parts.append(f"<h3>{esc(domain)}</h3>")
        for sample in items:
            answers = "".join(f"<tr><th>{esc(m)}</th><td><pre>{esc(a)}</pre></td></tr>"
                              for m, a in sample["answers"].items())
            parts.append(f"<table class='sample'><tr><th>prompt</th><td><pre>{esc(sample['prompt'])}</pre></td></tr>"
                         f"<tr><th>reference</th><td><pre>{esc(sample['reference'])}</pre></td></tr>{answers}</table>")
    return "<h2>Generation samples</h2>" + "".join(parts) if parts else ""


def _section_md(title: str, note: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A titled table of the report, in Markdown; nothing when it has no rows."""
    if not rows:
        return []
    return [f"## {title}", "", note, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _section_html(title: str, note: str, header: list[str], rows: list[list[str]], css: str = "") -> str:
    """The same table in HTML (``css``: the table's class, "sample" for left-aligned text)."""
    if not rows:
        return ""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    table = f"<table class='{css}'>" if css else "<table>"
    return f"<h2>{esc(title)}</h2><p>{esc(note).replace('`', '')}</p>{table}<tr>{head}</tr>{body}</table>"


def _html(record: RunRecord, rows: list[list[str]], plots: dict[str, bytes], notes: list[tuple[str, str]],
          samples: dict[str, list[dict]], harness: list[list[str]] = (), probes: list[list[str]] = (),
          answers: list[list[str]] = ()) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    imgs = "".join(f'<h2>{esc(PLOTS[n])}</h2><img style="max-width:100%" alt="{esc(PLOTS[n])}" '
                   f'src="data:image/png;base64,{base64.b64encode(p).decode()}">' for n, p in plots.items())
    summary = "".join(f"<p>{esc(s).replace('**', '')}</p>" for s in _summary(record))
    found = ("<h2>Findings</h2><ul>" + "".join(f"<li><b>{esc(k)}</b> {esc(n)}</li>" for k, n in notes)
             + "</ul>") if notes else ""
    warned = job_warnings(record)
    found += ("<h2>Warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in warned) + "</ul>") if warned else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(record.pipeline)}</title>"
            "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
            "td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
            "td:first-child,th:first-child{text-align:left}"
            ".sample td,.sample th{text-align:left;vertical-align:top}.sample pre{margin:0;white-space:pre-wrap}"
            "pre{white-space:pre-wrap;overflow-wrap:anywhere}"
            "</style></head><body>"
            f"<h1>branchout report: {esc(record.pipeline)}</h1>{summary}"
            f"<table><tr>{head}</tr>{body}</table>{found}"
            f"{_section_html('Answers', ANSWER_NOTE, ANSWER_HEADER, list(answers))}"
            f"{_section_html('Held-out split', SPLIT_NOTE, SPLIT_HEADER, split_rows(record))}"
            f"{_section_html('Precision', PRECISION_NOTE, PRECISION_HEADER, precision_rows(record), 'sample')}"
            f"{_section_html('Benchmarks (lm-evaluation-harness)', HARNESS_NOTE, HARNESS_HEADER, list(harness))}"
            f"{_section_html('Probe forecasts', FORECAST_NOTE, FORECAST_HEADER, list(probes), 'sample')}{imgs}"
            f"{_samples_html(samples)}"
            f"<h2>Lineage</h2><pre>{esc(lineage_text(record))}</pre></body></html>")
