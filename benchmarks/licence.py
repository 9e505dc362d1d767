"""The licence assistant as its header runs it: do the fine-tunes answer better than a
from-scratch model and than the majority answer?

    python benchmarks/licence.py            # ~15 minutes on 2 CPU cores

Builds the corpora (examples/corpus.py) and the Q&A set from this machine's Debian copyright
files (examples/licences.py) into benchmarks/out/licence-data, then runs ``branchout run
examples/licence_assistant.yaml`` with only its storage and data paths moved, and reads
``eval/metrics.json``: per domain, each model's exact match over the held-out questions with
its 95% Wilson interval, and the leave-one-out majority answer's.

Rule, fixed before measuring: one cold run (``--no-cache``). "Beats" means a higher exact
match with the two 95% intervals apart (the report's own rule, orchestrator/run/report.py).
Targets (issue 33): at least 200 held-out questions per domain; each fine-tune (full and
LoRA) beats the from-scratch model and the majority answer.
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
MIN_QUESTIONS = 200


def beats(a: float, a_ci: list[float], b: float, b_ci: list[float]) -> bool:
    return a > b and a_ci[0] > b_ci[1]


def answerable(data_uri: str, questions: int, qa_path: Path) -> dict[str, int]:
    """What the held-out questions ask, and how many have an answer that training gives to the
    same kind of question about the same package: the most that recalling what the model trained
    on could answer (a copyright holder of files it never saw, no model can know)."""
    import re

    from branchout.stages.prepare.instruct import heldout_prompts

    def key(prompt: str) -> tuple[str | None, str]:
        package = re.search(r"in the Debian package (.+)\?$", prompt)
        return (package[1] if package else None, "licence" if prompt.startswith("Which licence") else "holder")

    def normal(text: str) -> str:
        return " ".join(text.split()).casefold()

    held = [(h["messages"][-1]["content"], h["reference"]) for h in heldout_prompts(data_uri, questions)]
    asked = {prompt for prompt, _ in held}
    known: dict[tuple, set[str]] = {}
    for line in qa_path.read_text().splitlines():
        row = json.loads(line)
        if row["prompt"] not in asked:
            known.setdefault(key(row["prompt"]), set()).add(normal(row["response"]))
    return {"questions": len(held), "licence": sum(key(p)[1] == "licence" for p, _ in held),
            "answerable": sum(normal(ref) in known.get(key(p), set()) for p, ref in held)}


def main() -> int:
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO / "examples"))
    import licences
    from results import Target, stamp, status, targets_table, write_section

    import corpus

    data = OUT / "licence-data"
    corpus.build(str(data))
    built = licences.build(str(data))
    storage = OUT / "runs" / "licence"
    sets = [f"storage={storage}", f"pretrain.dataset.path={data / 'legal.jsonl'}",
            f"evaluate.lm_eval.include_path={data / 'tasks'}",
            *[f"finetune.domains.{i}.dataset.path={data / 'licences.jsonl'}" for i in (0, 1)]]
    started = time.time()
    proc = subprocess.run(["branchout", "run", str(REPO / "examples" / "licence_assistant.yaml"), "--no-cache",
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True)
    wall = time.time() - started
    lines = [f"`python benchmarks/licence.py` on {time.strftime('%Y-%m-%d')}: {stamp()}.", "",
             "`branchout run examples/licence_assistant.yaml` (storage and data paths moved, nothing else), one cold "
             f"run, {wall:.0f} s; {built.get('examples', '?')} question/answer pairs built from this machine's "
             "Debian copyright files. Exact match of greedy answers to held-out questions, with 95% Wilson "
             "intervals; the majority answer gives each question the commonest answer to the other held-out "
             "questions. \"Beats\": higher, with the intervals apart.", ""]
    targets: list[Target] = []
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
        why = f"the run exited {proc.returncode}"
        for domain in ("licences", "licences-lora"):
            targets += [Target(f"{domain}: held-out questions", f"≥ {MIN_QUESTIONS}", None, "not measured", why),
                        Target(f"{domain}: the fine-tune beats scratch and the majority answer", "beats both", None,
                               "not measured", why)]
    else:
        run_dir = max((storage / "licence-assistant").iterdir(), key=os.path.getmtime)
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
        state = json.loads((run_dir / "state.json").read_text())
        why_not = {}
        lines += ["| domain | method | questions | answered by | exact match | 95% interval |", "|---|---|---|---|---|---|"]
        for domain, row in metrics["domains"].items():
            em, ci = row["exact_match"], row["exact_match_ci"]
            scored = {**{m: (em[m], ci[m]) for m in ("base", "finetuned", "scratch") if m in em},
                      "majority answer": (row["majority"]["exact_match"], row["majority"]["exact_match_ci"])}
            for who, (value, interval) in scored.items():
                lines.append(f"| {domain} | {row['method']} | {row['questions']} | {who} | {value:.1%} | "
                             f"{interval[0]:.1%}-{interval[1]:.1%} |")
            ft = scored["finetuned"]
            wins = {who: beats(*ft, *scored[who]) for who in ("scratch", "majority answer") if who in scored}
            asked = answerable(state["jobs"][f"data/{domain}"]["outputs"]["uri"], row["questions"],
                               data / "licences.jsonl")
            why_not[domain] = (f"{asked['answerable']} of the {asked['questions']} questions "
                               f"({asked['answerable'] / asked['questions']:.0%}) have an answer that training gives "
                               "for the same package and question kind, the ceiling for recalling what it trained "
                               f"on ({asked['licence']} ask for a licence, the rest for a copyright holder); the "
                               f"fine-tune gets {ft[0]:.1%}, scratch {scored.get('scratch', (float('nan'),))[0]:.1%}, the majority answer "
                               f"(mostly `{row['majority']['answer']}`) {row['majority']['exact_match']:.1%}")
            targets.append(Target(f"{domain}: held-out questions", f"≥ {MIN_QUESTIONS}", str(row["questions"]),
                                  status(row["questions"] >= MIN_QUESTIONS),
                                  "the held-out split holds fewer questions on this machine"))
            verdict = ", ".join(f"{'beats' if won else 'does not beat'} {who} ({scored[who][0]:.1%})"
                                for who, won in wins.items())
            targets.append(Target(f"{domain}: the fine-tune beats scratch and the majority answer", "beats both",
                                  f"{ft[0]:.1%}: {verdict}", status(len(wins) == 2 and all(wins.values())),
                                  why_not[domain] if len(wins) == 2 else "scratch was not scored"))
        findings = [ln for ln in (run_dir / "report.md").read_text().splitlines()
                    if ln.startswith("- **Answers no better than a baseline.**")]
        if findings:
            lines += ["", "The report's findings:", "", *findings]
    lines += ["", *targets_table(targets)]
    print("\n".join(lines))
    write_section("Licence assistant answers (benchmarks/licence.py)", lines)
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
