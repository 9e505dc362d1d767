"""Run the quickstart as a user does, on this CPU and with its bf16 emulated, and print each
stage's wall time and tokens/s.

    python benchmarks/quickstart.py            # ~15 minutes on 2 CPU cores (two runs)

Builds the corpora into benchmarks/out/data and runs ``branchout run
examples/quickstart.yaml`` (the CLI, embedded Ray, ``precision: auto``, no setting changed)
twice, one after the other, and reads each run's state.json and metrics:

1. on this CPU as it is;
2. with ``ONEDNN_MAX_CPU_ISA=AVX2``, which makes torch emulate bf16 exactly as an AVX2-only
   CPU does (one-thread 512² matmuls on an AVX512-BF16 EPYC: bf16 201.7 → 2.0 GFLOP/s,
   fp32 79.8 → 76.4), so ``auto`` must pick fp32. Measured only where this CPU does bf16
   natively; elsewhere run 1 already is that case.

Rule, fixed before measuring: one cold run per side (a fresh embedded Ray each, CLI wall
time from start to exit), run 1 first. Before the runs, the CPU's one-thread fp32 512² matmul
rate (the median of 5 rounds of 20 matmuls): machines differ by 3× there, and a missed time
says which kind of machine missed it. (The quickstart's ZeRO-2 on CPU compiles no DeepSpeed
op since commit 4741165, so a machine's first run pays what later runs pay.)
Target (issue 25): a CPU without native bf16 finishes in ≤ 360 s.
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

from results import Target, stamp, status, targets_table, write_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"
TARGET_S = 360
EMULATE = {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def quickstart_command(storage: Path, data: Path) -> list[str]:
    """``branchout run`` of the shipped quickstart with its storage and corpora moved."""
    sets = [f"storage={storage}", f"pretrain.dataset.path={data / 'general.jsonl'}"]
    sets += [f"finetune.domains.{i}.dataset.path={data / n}.jsonl" for i, n in enumerate(("legal", "code", "docs"))]
    # --no-cache: every run computes every stage, as a user's first run does (runs of the
    # same storage would otherwise reuse the tokenizer and data of the previous benchmark)
    return ["branchout", "run", str(REPO / "examples" / "quickstart.yaml"), "--no-cache",
            *[a for s in sets for a in ("--set", s)]]


def run_once(label: str, data: Path, env: dict[str, str]) -> dict:
    """One cold quickstart; its wall time, stages, precision and scores."""
    storage = OUT / "runs" / label
    # cold as a user's first run: no tokenized data left in the storage by an earlier benchmark
    # (--no-cache skips the stage cache, not the data stage's own cache under <storage>/cache/data)
    shutil.rmtree(storage, ignore_errors=True)
    started = time.time()
    proc = subprocess.run(quickstart_command(storage, data), capture_output=True, text=True, env={**os.environ, **env})
    wall = time.time() - started
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{label}: the quickstart failed (exit {proc.returncode})")
    run_dir = max((storage / "quickstart").iterdir(), key=os.path.getmtime)
    state = json.loads((run_dir / "state.json").read_text())
    stages = []
    for group in ("tokenizer", "data", "pretrain", "finetune", "scratch", "evaluate"):
        jobs = [v for k, v in state["jobs"].items() if k.split("/")[0] == group]
        tps = [j["outputs"]["tokens_per_s"] for j in jobs if "tokens_per_s" in j["outputs"]]
        stages.append((group, len(jobs), max(j["ended"] for j in jobs) - min(j["started"] for j in jobs),
                       sum(tps) / len(tps) if tps else None))
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    return {"label": label, "wall": wall, "stages": stages, "metrics": metrics,
            "precision": metrics["precision"]["pretrain"],
            "pretrain_tps": state["jobs"]["pretrain"]["outputs"]["tokens_per_s"]}


def matmul_gflops(rounds: int = 5, n: int = 512, reps: int = 20) -> float:
    """One thread's fp32 n×n matmul rate in GFLOP/s: the median of ``rounds`` timings of ``reps``
    matmuls, measured in a process of its own (this one's threads are left alone)."""
    code = (f"import time, statistics, torch; torch.set_num_threads(1); a = torch.randn({n}, {n}); b = torch.randn({n}, {n}); "
            f"a @ b; t = []\nfor _ in range({rounds}):\n s = time.perf_counter()\n for _ in range({reps}): a @ b\n "
            f"t.append(time.perf_counter() - s)\nprint(2 * {n}**3 * {reps} / statistics.median(t) / 1e9)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def where(r: dict) -> str:
    return "this CPU" if r["label"] == "this-cpu" else "this CPU, bf16 emulated (`ONEDNN_MAX_CPU_ISA=AVX2`)"


def quickstart_targets(runs: list[dict], gflops: float) -> list:
    """The time target, for each run that trained in fp32 (a bf16 run has no time target).
    ``gflops``: this CPU's one-thread fp32 matmul rate, said with a miss."""
    def why(r: dict) -> str:
        pretrain = next(secs for group, _, secs, _ in r["stages"] if group == "pretrain")
        return (f"{r['wall']:.0f} s, over {TARGET_S} s: the pretrain alone took {pretrain:.0f} s at "
                f"{r['pretrain_tps']:,.0f} tokens/s (its steps are the shipped file's); this CPU's one-thread fp32 "
                f"512² matmul ran {gflops:.1f} GFLOP/s")

    what, target = "end to end where the CPU trains in fp32 (no native bf16)", f"≤ {TARGET_S} s"
    targets = [Target(f"{where(r)}, {what}", target, f"{r['wall']:.0f} s", status(r["wall"] <= TARGET_S), why=why(r))
               for r in runs if r["precision"]["used"] != "bf16"]
    return targets or [Target(what, target, None, "not measured",
                              why="`auto` chose bf16 in every run, so no run trained in fp32")]


def main() -> int:
    from branchout.core.precision import cpu_hardware

    data = OUT / "data"
    subprocess.run([sys.executable, str(REPO / "examples" / "corpus.py"), str(data)], check=True,
                   stdout=subprocess.DEVNULL)
    stamped = stamp()  # before the runs: the commit and machine they measure
    native = cpu_hardware().bf16
    gflops = matmul_gflops()
    runs = [run_once("this-cpu", data, {})]
    if native:
        runs.append(run_once("bf16-emulated", data, EMULATE))

    lines = [f"`python benchmarks/quickstart.py` on {time.strftime('%Y-%m-%d')}: `branchout run "
             "examples/quickstart.yaml` as the README runs it (no setting changed), one cold run per side, "
             "CLI wall time with Ray's start included. " + stamped + f"; one-thread fp32 512² matmul "
             f"{gflops:.1f} GFLOP/s (median of 5 rounds).", "",
             "| CPU | auto → | end to end | pretrain tokens/s |", "|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {where(r)} | {r['precision']['used']} | {r['wall']:.0f} s | {r['pretrain_tps']:,.0f} |")
    if not native:
        lines.append("| this CPU, bf16 emulated | not run: this CPU has no native bf16, so the first row is that case "
                     "| - | - |")
    lines += ["", "Why `auto` chose what it did, per run: " + "; ".join(
        f"{r['label']}: {r['precision']['reason']}" for r in runs) + "."]
    for r in runs:
        lines += ["", f"Run `{r['label']}`:", "", "| domain | method | base ppl | fine-tuned ppl | scratch ppl | "
                  "transfer gain |", "|---|---|---|---|---|---|"]
        for name, m in r["metrics"]["domains"].items():
            scratch = f"{m['scratch_ppl']:.1f}" if "scratch_ppl" in m else "-"
            lines.append(f"| {name} | {m['method']} | {m['base_ppl']:.1f} | {m['finetuned_ppl']:.1f} | {scratch} | "
                         f"{1 - m['finetuned_ppl'] / m['base_ppl']:.1%} |")
        lines += ["", "| stage | jobs | wall s | tokens/s per job |", "|---|---|---|---|"]
        lines += [f"| {g} | {n} | {secs:.1f} | {f'{tps:,.0f}' if tps else '-'} |" for g, n, secs, tps in r["stages"]]
    lines += ["", *targets_table(quickstart_targets(runs, gflops))]
    print("\n".join(lines))
    write_section("Quickstart (benchmarks/quickstart.py)", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
