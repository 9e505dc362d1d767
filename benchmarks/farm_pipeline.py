"""Adapter farms in whole pipeline runs, as a user runs them: 8 LoRA domains, then 64.

    python benchmarks/farm_pipeline.py            # ~20 minutes on 2 CPU cores

Both runs are ``branchout run`` (the CLI, embedded Ray) of the shipped quickstart with its
fine-tune domains replaced by LoRA domains over the quickstart's three domain corpora (a
corpus serves several domains under different names; their packed data is one cache entry)
and ``farm: auto`` (the default):

1. **8 LoRA domains**, the quickstart's fine-tune settings (60 steps): the farms the plan
   shows, the run's wall time, and whether the report names the domains that trained
   together;
2. **64 LoRA domains** in the same storage (tokenizer, data and pretrain reused from the stage
   cache), 20 steps each, only the fine-tuned models scored: whether one pipeline run
   completes them all, in how many farms, in what wall time.

Rule, fixed before measuring: one run each, cold (a fresh embedded Ray), wall time of the
CLI from start to exit. Targets (issue 28): the 8-domain run succeeds with ``farm: auto`` and
its report shows which domains trained together; 64 domains complete in one pipeline run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quickstart import OUT, REPO  # noqa: E402
from results import Target, stamp, status, targets_table, write_section  # noqa: E402

CORPORA = ("legal", "code", "docs")


def pipeline(path: Path, storage: Path, data: Path, domains: int, steps: int, models: list[str]) -> Path:
    import yaml

    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    spec["name"] = "farm-pipeline"
    spec["storage"] = str(storage)
    spec["pretrain"]["dataset"]["path"] = str(data / "general.jsonl")
    spec["finetune"]["defaults"].update(method="lora", steps=steps, lora={"rank": 16, "alpha": 32},
                                        optimizer={"lr": 3.0e-3})
    spec["finetune"]["defaults"].pop("eval_every", None)  # a farm member is not scored while it trains
    spec["finetune"]["domains"] = [{"name": f"{CORPORA[i % 3]}-{i}", "dataset": {"path": str(data / f"{CORPORA[i % 3]}.jsonl")}}
                                   for i in range(domains)]
    spec["evaluate"].update(models=models, cross=False)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(path: Path) -> dict:
    import yaml

    storage = Path(yaml.safe_load(path.read_text())["storage"]) / "farm-pipeline"
    earlier = set(storage.iterdir()) if storage.is_dir() else set()  # the 64-domain run shares the 8's storage
    started = time.time()
    proc = subprocess.run(["branchout", "run", str(path)], capture_output=True, text=True, env=os.environ.copy())
    wall = time.time() - started
    tail = proc.stdout[-1500:] + proc.stderr[-1500:]
    made = sorted(set(storage.iterdir()) - earlier) if storage.is_dir() else []
    run_dir = made[-1] if made else None
    if run_dir is None or not (run_dir / "state.json").exists():  # it failed before it had a run to read
        return {"rc": proc.returncode, "wall": wall, "state": None, "jobs": 0, "succeeded": 0, "farms": Counter(),
                "farm_lines": [], "tail": tail}
    state = json.loads((run_dir / "state.json").read_text())
    jobs = {n: j for n, j in state["jobs"].items() if n.startswith("finetune/")}
    farms = Counter(j["outputs"].get("farm") for j in jobs.values() if j["state"] == "succeeded")
    report = (run_dir / "report.md").read_text() if (run_dir / "report.md").exists() else ""
    return {"rc": proc.returncode, "wall": wall, "state": state["state"], "jobs": len(jobs),
            "succeeded": sum(j["state"] == "succeeded" for j in jobs.values()), "farms": farms,
            "farm_lines": [ln for ln in report.splitlines() if "Adapter farm farm-" in ln], "tail": tail}


def pipeline_targets(eight: dict, many: dict) -> list[Target]:
    """The two targets, from what each run returned (a run that left no state measured nothing)."""

    def outcome(r: dict, domains: int, lines: bool) -> tuple[str | None, str, str]:
        if r["state"] is None:
            return None, "not measured", f"the run exited {r['rc']} before it wrote a state to read"
        measured = f"{r['succeeded']}/{domains} fine-tunes succeeded, run {r['state']}, exit {r['rc']}"
        if lines:
            measured += f", {len(r['farm_lines'])} farm line(s) in the report"
        short = ([f"the run exited {r['rc']}"] if r["rc"] != 0 else []) + (
            [f"{r['succeeded']} of {domains} fine-tunes succeeded"] if r["succeeded"] != domains else []) + (
            ["the report names no farm"] if lines and not r["farm_lines"] else [])
        return measured, status(not short), "; ".join(short)

    measured, state, why = outcome(eight, 8, lines=True)
    targets = [Target("8 LoRA domains", "run with farm: auto and the report shows which trained together",
                      measured, state, why=why)]
    measured, state, why = outcome(many, 64, lines=False)
    targets.append(Target("64 domains on the quickstart base", "complete in one pipeline run", measured, state, why=why))
    return targets


def main() -> None:
    data = OUT / "data"
    if not (data / "general.jsonl").exists():
        subprocess.run([sys.executable, str(REPO / "examples" / "corpus.py"), str(data)], check=True)
    work = OUT / "farm-pipeline"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    storage = work / "runs"
    eight = run(pipeline(work / "eight.yaml", storage, data, 8, 60, ["base", "finetuned", "scratch"]))
    many = run(pipeline(work / "sixty-four.yaml", storage, data, 64, 20, ["finetuned"]))
    for label, r in (("8 domains", eight), ("64 domains", many)):
        if r["rc"] != 0:
            print(f"{label}: exit {r['rc']}\n{r['tail']}", file=sys.stderr)

    def farms_text(r: dict) -> str:
        alone = r["farms"].pop(None, 0)
        text = ", ".join(f"{f}: {n}" for f, n in sorted(r["farms"].items(), key=lambda kv: int(kv[0].split("-")[1])))
        return text + (f"; alone: {alone}" if alone else "")

    body = [
        f"Measured by `python benchmarks/farm_pipeline.py`: {stamp()}.",
        "",
        "`branchout run` of the quickstart with LoRA domains over its three domain corpora, `farm: auto`; "
        "one cold run each, the second in the first's storage (tokenizer, data, pretrain from the stage cache).",
        "",
        "| run | fine-tunes succeeded | farms (members) | run state | wall time |",
        "|---|---|---|---|---|",
        f"| 8 LoRA domains, 60 steps, base/finetuned/scratch scored | {eight['succeeded']}/{eight['jobs']} | "
        f"{farms_text(eight)} | {eight['state'] or '-'} | {eight['wall']:.0f} s |",
        f"| 64 LoRA domains, 20 steps, finetuned scored | {many['succeeded']}/{many['jobs']} | {farms_text(many)} | "
        f"{many['state'] or '-'} | {many['wall']:.0f} s |",
        "",
        "The 8-domain report's farm lines:",
        "",
        *([f"    {ln}" for ln in eight["farm_lines"]] or ["    (none)"]),
        "",
        *targets_table(pipeline_targets(eight, many)),
    ]
    print("\n".join(body))
    write_section("Adapter farms in pipeline runs (benchmarks/farm_pipeline.py)", body)


if __name__ == "__main__":
    main()
