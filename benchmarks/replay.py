"""Does ``finetune.replay`` limit forgetting? The quickstart with and without it, measured.

    python benchmarks/replay.py            # ~9 minutes on 2 CPU cores

Runs the shipped ``examples/quickstart.yaml`` (``evaluate.cross: true``: every model is
scored on the general held-out text) through the CLI, then runs it again in the same storage
with ``--set finetune.defaults.replay=0.1``. The second run reuses the tokenizer, the packed
data and the pretrain from the stage cache (replay changes only the fine-tunes' keys, which
the script checks), so both sides fine-tune the same base on the same domain blocks.

Rule, fixed before measuring: one run per side, same machine, one after the other. Per
fine-tune, the general-text perplexity (``eval/metrics.json`` ``cross[finetune/<d>].general``)
and its own domain's; the ratio replay / no replay. Target (issue 29): every full fine-tune's
general-text perplexity is lower with ``replay: 0.1`` (ratio < 1). The LoRA domain is shown
too, not judged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quickstart import OUT, REPO  # noqa: E402
from results import Target, stamp, status, targets_table, write_section  # noqa: E402

REPLAY = 0.1


def run(storage: Path, data: Path, *extra: str) -> Path:
    sets = [f"storage={storage}", f"pretrain.dataset.path={data / 'general.jsonl'}", *extra]
    sets += [f"finetune.domains.{i}.dataset.path={data / n}.jsonl" for i, n in enumerate(("legal", "code", "docs"))]
    cmd = ["branchout", "run", str(REPO / "examples" / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"quickstart failed ({' '.join(extra) or 'no replay'})")
    runs = sorted((storage / "quickstart").iterdir())
    return runs[-1]


def replay_target(verdicts: list[tuple[str, float]]) -> Target:
    """The target from each full fine-tune's general-text perplexity ratio, replay / no replay."""
    what, target = ("every full fine-tune forgets less of the general text with replay",
                    "ratio < 1 (general-text perplexity, replay / no replay)")
    if not verdicts:
        return Target(what, target, None, "not measured", why="the quickstart has no full fine-tune")
    return Target(what, target, ", ".join(f"{j} {r:.3f}" for j, r in verdicts), status(all(r < 1 for _, r in verdicts)),
                  why="ratio ≥ 1 for " + ", ".join(j for j, r in verdicts if r >= 1))


def main() -> None:
    data = OUT / "data"
    if not (data / "general.jsonl").exists():
        subprocess.run([sys.executable, str(REPO / "examples" / "corpus.py"), str(data)], check=True)
    storage = OUT / "runs" / "replay"
    if storage.exists():
        import shutil

        shutil.rmtree(storage)
    plain = run(storage, data)
    replayed = run(storage, data, f"finetune.defaults.replay={REPLAY}")
    state = json.loads((replayed / "state.json").read_text())
    reused = sorted(n for n, j in state["jobs"].items() if j["outputs"].get("cached_from"))
    assert {"tokenizer", "pretrain", "data/pretrain"} <= set(reused), reused  # the same base, the same blocks
    cross = {side: json.loads((d / "eval" / "metrics.json").read_text())["cross"] for side, d in
             (("plain", plain), ("replay", replayed))}
    import yaml

    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    methods = {d["name"]: d.get("method", spec["finetune"]["defaults"].get("method", "full"))
               for d in spec["finetune"]["domains"]}
    rows, verdicts = [], []
    for domain, method in methods.items():
        job = f"finetune/{domain}"
        g0, g1 = cross["plain"][job]["general"], cross["replay"][job]["general"]
        d0, d1 = cross["plain"][job][domain], cross["replay"][job][domain]
        rows.append(f"| {job} ({method}) | {g0:.2f} | {g1:.2f} | {g1 / g0:.3f} | {d0:.2f} | {d1:.2f} | {d1 / d0:.3f} |")
        if method == "full":
            verdicts.append((job, g1 / g0))
    base = cross["plain"]["base"]["general"]
    body = [
        f"Measured by `python benchmarks/replay.py`: {stamp()}.",
        "",
        f"The shipped quickstart, then the same with `finetune.defaults.replay: {REPLAY}` in the same storage "
        f"(reused from the stage cache: {', '.join(reused)}). One run per side. "
        f"The base's general-text perplexity: {base:.2f}.",
        "",
        "| fine-tune | general ppl, no replay | general ppl, replay | ratio | own-domain ppl, no replay "
        "| own-domain ppl, replay | ratio |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        *targets_table([replay_target(verdicts)]),
    ]
    print("\n".join(body))
    write_section("Replay: what a fine-tune forgets of the general text", body)


if __name__ == "__main__":
    main()
