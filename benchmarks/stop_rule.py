"""Does ``pretrain.stop`` end a too-long pretrain early without costing the fine-tunes? (issue 30)

    python benchmarks/stop_rule.py            # ~20 minutes on 2 Zen 4 cores, ~62 on 2 Zen 1 (two runs)
    python benchmarks/stop_rule.py --reuse    # the section again from the last two runs (their stamp kept)

Two ``branchout run``s of the shipped quickstart, one after the other, identical but for
``pretrain.stop``:

1. **full budget**: ``pretrain.steps`` = ``BUDGET`` (4× the quickstart's 400 steps), a
   warmup-stable-decay schedule (what the plan recommends with probes: checkpoints before
   the cooldown are comparable), LoRA probes of ``PROBE_STEPS`` steps every ``EVERY`` steps;
2. **stopped**: the same with ``pretrain.stop: {epsilon: EPSILON}`` (patience 2, the
   default): the pretrain ends, then cools down, once every domain is saturated: two probe
   points in a row forecast less than ``EPSILON`` relative gain from the rest of the budget,
   or its best probe loss improved over the last two points at a rate that would gain less
   than ``EPSILON`` by the budget's end (``stages.evaluation.forecast.stop_decision``).

Both fine-tune every domain as the quickstart does and score base and fine-tuned models on
the same held-out sets (no scratch model, no cross evaluation: neither is compared here).

The budget's premise, "4× what saturates the domains", is the quickstart's 400 steps against
1,600; it is not assumed: the full run's own probes say how much each domain's probe loss
still fell from step 400 to the end, and at which step each was best, printed beside the
targets. A stop at ≤ 50% (its cooldown included) is decided at step 700 at the latest; where a
domain's probes were still improving past that, the premise did not hold on that run.

Rule, fixed before measuring: one run each, full budget first; every number is read from what
the runs wrote (state.json, eval/metrics.json, the pretrain's forecast.json). Targets (issue
30): the stopped pretrain trains ≤ 50% of the budget's steps (its cooldown included); every
domain's fine-tuned perplexity is within 1% of the full-budget run's (not more than 1.01×).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quickstart import OUT, REPO  # noqa: E402
from results import Target, stamp, status, targets_table, write_section  # noqa: E402

BUDGET = 1600
EVERY = 100  # a forecast needs 3 points and the rule 2 in a row: the earliest stop is the 4th point
PROBE_STEPS = 20
EPSILON = 0.01
DOMAINS = ("legal", "code", "docs")


def command(label: str, data: Path, stop: bool) -> list[str]:
    storage = OUT / "runs" / label
    shutil.rmtree(storage, ignore_errors=True)
    sets = [f"storage={storage}", f"pretrain.dataset.path={data / 'general.jsonl'}", f"pretrain.steps={BUDGET}",
            "pretrain.schedule.kind=wsd", f"pretrain.probes={{every: {EVERY}, steps: {PROBE_STEPS}}}",
            "pretrain.checkpoint_every=200", "pretrain.eval_every=400",
            "evaluate.models=[base, finetuned]", "evaluate.cross=false"]
    sets += [f"finetune.domains.{i}.dataset.path={data / n}.jsonl" for i, n in enumerate(DOMAINS)]
    if stop:
        sets.append(f"pretrain.stop={{epsilon: {EPSILON}}}")
    return ["branchout", "run", str(REPO / "examples" / "quickstart.yaml"), "--no-cache",
            *[a for s in sets for a in ("--set", s)]]


def run(label: str, data: Path, stop: bool) -> dict:
    started = time.time()
    proc = subprocess.run(command(label, data, stop), capture_output=True, text=True, env=os.environ.copy())
    wall = time.time() - started
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{label}: the run failed (exit {proc.returncode})")
    # what only this process saw, kept beside the run so --reuse reports it as measured
    (OUT / "runs" / label / "measured.json").write_text(json.dumps({"wall": wall, "stamp": stamp()}))
    return read(label)


def read(label: str) -> dict:
    """A finished run of ``label``: what it wrote and what this script measured of it."""
    measured = json.loads((OUT / "runs" / label / "measured.json").read_text())
    wall = measured["wall"]
    run_dir = max((OUT / "runs" / label / "quickstart").iterdir(), key=os.path.getmtime)
    state = json.loads((run_dir / "state.json").read_text())
    pretrain = state["jobs"]["pretrain"]
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    forecast = json.loads((run_dir / "pretrain" / "probes" / "forecast.json").read_text())
    r = {"label": label, "wall": wall, "pretrain": pretrain, "metrics": metrics, "forecast": forecast,
         "pretrain_s": pretrain["ended"] - pretrain["started"], "stamp": measured["stamp"]}
    print(f"{label}: {wall:.0f} s, pretrain {steps_trained(r)} steps", flush=True)
    return r


def steps_trained(r: dict) -> int:
    """The pretrain's optimizer steps, its cooldown included (the run records the tokens a stop saved)."""
    return BUDGET - int(r["pretrain"]["outputs"].get("tokens_saved", 0)) // int(r["forecast"]["tokens_per_step"])


def last_reason(forecast: dict) -> str:
    """Why the rule did not stop at the last probe point before the budget's end, replayed with
    the product's own forecast and stop rule over the probe losses the run recorded (at the
    budget's end the rule is not asked: nothing is left to save)."""
    stop = forecast.get("stop") or {}
    if not stop.get("rule"):
        return stop.get("why") or "no stop rule"
    return reason_before(forecast, BUDGET)


def reason_before(forecast: dict, step: int) -> str:
    """The rule's answer at the last probe point before ``step``, replayed as ``last_reason``."""
    from branchout.stages.evaluation.forecast import forecast_history, stop_decision

    rule = (forecast.get("stop") or {}).get("rule")
    n = len([p for p in forecast.get("points", []) if p < step])
    if not rule or n == 0:
        return "no probe point before it"
    history, now = forecast_history(forecast["points"][:n], {d: v["losses"][:n] for d, v in forecast["domains"].items()},
                                    forecast["tokens_per_step"], forecast["budget_tokens"])
    why = stop_decision(history, now, rule["epsilon"], rule.get("weights"), rule.get("patience", 2))[1]
    return f"step {forecast['points'][n - 1]}: {why}"


def stop_targets(full: dict, stopped: dict, last: str | None = None) -> list[Target]:
    """The two targets; ``last``: why the rule went on at its last chance (replayed when not given)."""
    trained = steps_trained(stopped)
    share = trained / BUDGET
    at = stopped["pretrain"]["outputs"].get("stopped_at")
    targets = [Target("The stopped pretrain's steps (cooldown included)", f"≤ 50% of the {BUDGET}-step budget",
                      f"{trained} steps, {share:.0%}" + (f" (stopped at {at})" if at else " (never stopped)"),
                      status(share <= 0.5),
                      why=(f"{share:.0%} of the budget: " + (
                          f"stopped at step {at}; at the probe before, {reason_before(stopped['forecast'], at)}"
                          if at else f"the rule never fired; at the last probe: {last or last_reason(stopped['forecast'])}")))]
    what, target = "Fine-tuned perplexity after the stopped pretrain", "within 1% of the full budget's"
    if not at:  # both runs trained the whole budget: equal perplexities would prove nothing
        return [*targets, Target(what, target, None, "not measured",
                                 why="the rule never stopped the pretrain, so both runs trained the same steps")]
    worse = {}
    for d in DOMAINS:
        a, b = full["metrics"]["domains"][d]["finetuned_ppl"], stopped["metrics"]["domains"][d]["finetuned_ppl"]
        worse[d] = b / a - 1
    off = [d for d, w in worse.items() if w > 0.01]
    targets.append(Target(what, target, ", ".join(f"{d} {w:+.2%}" for d, w in worse.items()), status(not off),
                          why=f"more than 1% worse for {', '.join(off)}"))
    return targets


def main() -> None:
    data = OUT / "data"
    if not (data / "general.jsonl").exists():
        subprocess.run([sys.executable, str(REPO / "examples" / "corpus.py"), str(data)], check=True)
    if "--reuse" in sys.argv:
        full, stopped = read("stop-full"), read("stop-rule")
    else:
        full, stopped = run("stop-full", data, stop=False), run("stop-rule", data, stop=True)

    rows = []
    for d in DOMAINS:
        fm, sm = full["metrics"]["domains"][d], stopped["metrics"]["domains"][d]
        rows.append(f"| {d} | {fm['base_ppl']:.1f} | {sm['base_ppl']:.1f} | {fm['finetuned_ppl']:.2f} | "
                    f"{sm['finetuned_ppl']:.2f} | {sm['finetuned_ppl'] / fm['finetuned_ppl'] - 1:+.2%} |")
    # the premise: how much each domain's probe loss still fell over the last 3/4 of the budget
    points = full["forecast"]["points"]
    quarter = max((i for i, p in enumerate(points) if p <= BUDGET // 4), default=None)
    premise = [] if quarter is None else [
        f"{d} {v[quarter]:.3f} → {v[-1]:.3f} ({v[-1] / v[quarter] - 1:+.1%}), best at step {best} "
        f"({best / BUDGET:.0%} of the budget)"
        for d in DOMAINS for v in [full["forecast"]["domains"][d]["losses"]]
        for best in [points[min(range(len(v)), key=lambda i: v[i])]]]
    out = stopped["pretrain"]["outputs"]
    # why the rule went on at its last chance: a replay of every probe point's forecast, only
    # where it never stopped, and once
    last = None if out.get("stopped_at") else last_reason(stopped["forecast"])
    now = stamp()
    written = "" if full["stamp"] == now else f" (this section written again by {now.split(';')[0]})"
    body = [f"Measured by `python benchmarks/stop_rule.py`: {full['stamp']}{written}.", "",
            f"The shipped quickstart with a {BUDGET}-step pretrain (4× its own 400), `schedule.kind: wsd`, LoRA "
            f"probes of {PROBE_STEPS} steps every {EVERY} steps, run twice: to the end of the budget, and with "
            f"`pretrain.stop: {{epsilon: {EPSILON}}}` (patience 2). Fine-tunes and held-out sets as the quickstart's.",
            "",
            "| run | wall | pretrain | pretrain steps | probes |", "|---|---|---|---|---|",
            *(f"| {r['label']} | {r['wall']:.0f} s | {r['pretrain_s']:.0f} s | {steps_trained(r)} | "
              f"{r['pretrain']['outputs'].get('probe_seconds', 0):.0f} s at {len(r['forecast']['points'])} points |"
              for r in (full, stopped)), "",
            f"Why it stopped: {out.get('stop_reason') if last is None else 'it did not; at its last chance, ' + last}; "
            f"tokens saved: {out.get('tokens_saved', 0):,}.",
            "",
            "| domain | base ppl (full) | base ppl (stopped) | fine-tuned ppl (full) | fine-tuned ppl (stopped) | "
            "stopped vs full |", "|---|---|---|---|---|---|", *rows, "",
            f"The premise, from the full run's probes (probe loss at step ≤ {BUDGET // 4} → at step {points[-1]}, and "
            "the step of the domain's best probe): "
            + ("; ".join(premise) or "no probe point in the first quarter") + ".", "",
            *targets_table(stop_targets(full, stopped, last))]
    print("\n".join(body))
    write_section("Stop rule: a 4× pretraining budget (benchmarks/stop_rule.py)", body)


if __name__ == "__main__":
    main()
