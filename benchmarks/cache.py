"""The stage cache on the quickstart: a second run with nothing changed, and one with a
single domain's data changed, against the first run, side by side in one process.

    python benchmarks/cache.py        # ~7 minutes on 2 cores (one full quickstart + two cheap runs)

Rule, fixed before measuring: one run each, in one storage, CLI wall time with Ray's start;
which jobs were computed is read from each run's state.json. Targets (README, "Guide:
retraining"): a second run with nothing changed computes no job; after new legal data, a run
computes exactly ``data/legal`` and the jobs downstream of it (the run's own job graph, as
recorded in its state.json), every other job reused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from quickstart import quickstart_command  # noqa: E402
from results import Target, stamp, status, targets_table, write_section  # noqa: E402


def run(work: Path, data: Path, cached: bool = True) -> tuple[float, dict[str, str], dict[str, list[str]]]:
    """One quickstart run; its wall time, every job's state and every job's parents."""
    command = quickstart_command(work / "runs", data)
    if cached:  # quickstart_command computes everything (--no-cache): the runs after the first reuse
        command = [a for a in command if a != "--no-cache"]
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-2000:])
    newest = max((work / "runs" / "quickstart").iterdir(), key=lambda p: p.name)
    states = json.loads((newest / "state.json").read_text())["jobs"]
    return seconds, {k: v["state"] for k, v in states.items()}, {k: v.get("parents", []) for k, v in states.items()}


def downstream(parents: dict[str, list[str]], start: str) -> set[str]:
    """``start`` and every job that depends on it, from the parents a run recorded."""
    out, grew = {start}, True
    while grew:
        grew = False
        for job, ps in parents.items():
            if job not in out and out.intersection(ps):
                out.add(job)
                grew = True
    return out


def main() -> int:
    stamped = stamp()  # before the runs: the commit and machine they measure
    work = Path(tempfile.mkdtemp(prefix="branchout-cache-bench-"))
    data = work / "data"
    subprocess.run([sys.executable, str(REPO / "examples" / "corpus.py"), str(data)], check=True,
                   stdout=subprocess.DEVNULL)
    first, _, _ = run(work, data, cached=False)
    same, same_states, _ = run(work, data)
    with open(data / "legal.jsonl", "a") as f:
        f.write(json.dumps({"text": "Licence terms added after the first run. " * 60}) + "\n")
    changed, changed_states, parents = run(work, data)
    computed = sorted(k for k, v in changed_states.items() if v == "succeeded")
    recomputed = sorted(k for k, v in same_states.items() if v == "succeeded")
    expected = sorted(downstream(parents, "data/legal"))
    extra, lacking = sorted(set(computed) - set(expected)), sorted(set(expected) - set(computed))
    lines = [f"`python benchmarks/cache.py` on {time.strftime('%Y-%m-%d')}: the quickstart three times in one "
             f"storage, CLI wall time with Ray's start included; {stamped}.", "",
             "Rule: one run each; the first with `--no-cache`, the others reusing what the storage holds; "
             "a job counts as computed when its state is `succeeded` (a reused one is `cached`).", "",
             "| run | seconds | vs first | jobs computed |", "|---|---|---|---|",
             f"| first (nothing cached) | {first:.1f} | 1.00 | all |",
             f"| second, nothing changed | {same:.1f} | {same / first:.2f} | {', '.join(recomputed) or 'none'} |",
             f"| third, legal data changed | {changed:.1f} | {changed / first:.2f} | {', '.join(computed)} |", "",
             *targets_table([
                 Target("a run with nothing changed", "computes no job", f"{len(recomputed)} of "
                        f"{len(same_states)} jobs computed", status(not recomputed),
                        why=f"computed again: {', '.join(recomputed)}"),
                 Target("a run after new legal data", "computes only `data/legal` and the jobs downstream of it",
                        f"{len(computed)} computed, {len(expected)} downstream", status(computed == expected),
                        why="; ".join(x for x in (f"computed, not downstream: {', '.join(extra)}" if extra else "",
                                                  f"downstream, reused: {', '.join(lacking)}" if lacking else "")
                                      if x))])]
    print("\n".join(lines))
    write_section("Stage cache (benchmarks/cache.py)", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
