"""Run the quickstart and print each stage's wall time and tokens/s.

    python benchmarks/quickstart.py            # ~5 minutes on 2 CPU cores

Builds the corpora into benchmarks/out/data, runs ``branchout run examples/quickstart.yaml``
as a user would (the CLI, embedded Ray) and reads the run's state.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"


def quickstart_command(storage: Path, data: Path) -> list[str]:
    """``branchout run`` of the shipped quickstart with its storage and corpora moved."""
    sets = [f"storage={storage}", f"pretrain.dataset.path={data / 'general.jsonl'}"]
    sets += [f"finetune.domains.{i}.dataset.path={data / n}.jsonl" for i, n in enumerate(("legal", "code", "docs"))]
    return ["branchout", "run", str(REPO / "examples" / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)]]


def main() -> int:
    data = OUT / "data"
    subprocess.run([sys.executable, str(REPO / "examples" / "corpus.py"), str(data)], check=True,
                   stdout=subprocess.DEVNULL)
    started = time.time()
    proc = subprocess.run(quickstart_command(OUT / "runs", data), capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    run_dir = max((OUT / "runs" / "quickstart").iterdir(), key=os.path.getmtime)
    state = json.loads((run_dir / "state.json").read_text())
    rows = []
    for group in ("tokenizer", "data", "pretrain", "finetune", "scratch", "evaluate"):
        jobs = [v for k, v in state["jobs"].items() if k.split("/")[0] == group]
        start = min(j["started"] for j in jobs)
        end = max(j["ended"] for j in jobs)
        tps = [j["outputs"]["tokens_per_s"] for j in jobs if "tokens_per_s" in j["outputs"]]
        rows.append((group, len(jobs), end - start, sum(tps) / len(tps) if tps else None))
    lines = [f"`python benchmarks/quickstart.py` on {time.strftime('%Y-%m-%d')}: `branchout run "
             f"examples/quickstart.yaml` as the README runs it, {wall:.0f} s end to end (CLI wall time, Ray's start "
             "included).", "",
             "| domain | method | base ppl | fine-tuned ppl | scratch ppl | transfer gain |", "|---|---|---|---|---|---|"]
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for name, m in metrics["domains"].items():
        scratch = f"{m['scratch_ppl']:.1f}" if "scratch_ppl" in m else "-"
        lines.append(f"| {name} | {m['method']} | {m['base_ppl']:.1f} | {m['finetuned_ppl']:.1f} | {scratch} | "
                     f"{1 - m['finetuned_ppl'] / m['base_ppl']:.1%} |")
    lines += ["", "| stage | jobs | wall s | tokens/s per job |", "|---|---|---|---|"]
    lines += [f"| {g} | {n} | {secs:.1f} | {f'{tps:,.0f}' if tps else '-'} |" for g, n, secs, tps in rows]
    print("\n".join(lines))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from results import write_section

    write_section("Quickstart (benchmarks/quickstart.py)", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
