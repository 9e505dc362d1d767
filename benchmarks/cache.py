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


def run(work: Path, data: Path) -> tuple[float, dict[str, str]]:
    started = time.perf_counter()
    out = subprocess.run(quickstart_command(work / "runs", data), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-2000:])
    newest = max((work / "runs" / "quickstart").iterdir(), key=lambda p: p.name)
    states = json.loads((newest / "state.json").read_text())["stages"]
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
    print("stage cache on the quickstart (CLI wall time, Ray start included), 2 CPU cores")
    print(f"{'run':34s} {'seconds':>8s} {'vs first':>9s}  jobs computed")
    print(f"{'first (nothing cached)':34s} {first:8.1f} {1:9.2f}  all")
    print(f"{'second, nothing changed':34s} {same:8.1f} {same / first:9.2f}  "
          f"{sum(v == 'succeeded' for v in same_states.values())}")
    print(f"{'third, legal data changed':34s} {changed:8.1f} {changed / first:9.2f}  {', '.join(computed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
