"""The stage cache on the quickstart: a second run with nothing changed, and one with a
single domain's data changed, against the first run, side by side in one process.

    python benchmarks/cache.py        # ~7 minutes on 2 cores (one full quickstart + two cheap runs)
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
from results import write_section  # noqa: E402


def run(work: Path, data: Path) -> tuple[float, dict[str, str]]:
    started = time.perf_counter()
    out = subprocess.run(quickstart_command(work / "runs", data), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-2000:])
    newest = max((work / "runs" / "quickstart").iterdir(), key=lambda p: p.name)
    states = json.loads((newest / "state.json").read_text())["jobs"]
    return seconds, {k: v["state"] for k, v in states.items()}


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="branchout-cache-bench-"))
    data = work / "data"
    subprocess.run([sys.executable, str(REPO / "examples" / "corpus.py"), str(data)], check=True,
                   stdout=subprocess.DEVNULL)
    first, _ = run(work, data)
    same, same_states = run(work, data)
    with open(data / "legal.jsonl", "a") as f:
        f.write(json.dumps({"text": "Licence terms added after the first run. " * 60}) + "\n")
    changed, changed_states = run(work, data)
    computed = sorted(k for k, v in changed_states.items() if v == "succeeded")
    recomputed = sum(v == "succeeded" for v in same_states.values())
    lines = [f"`python benchmarks/cache.py` on {time.strftime('%Y-%m-%d')}: the quickstart three times, CLI wall "
             "time with Ray's start included.", "",
             "| run | seconds | vs first | jobs computed |", "|---|---|---|---|",
             f"| first (nothing cached) | {first:.1f} | 1.00 | all |",
             f"| second, nothing changed | {same:.1f} | {same / first:.2f} | {recomputed} |",
             f"| third, legal data changed | {changed:.1f} | {changed / first:.2f} | {', '.join(computed)} |"]
    print("\n".join(lines))
    write_section("Stage cache (benchmarks/cache.py)", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
