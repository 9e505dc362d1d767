"""examples/licence_assistant.yaml as its header runs it, minutes shortened: the licence Q&A
set built from this machine's Debian copyright files, full and LoRA supervised fine-tunes,
answers scored and shown."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from branchout.orchestrator.run.state import RunRecord, RunState

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

SHORT = ["pretrain.steps=20", "pretrain.checkpoint_every=10", "pretrain.schedule.warmup_steps=2",
         "finetune.defaults.steps=10", "finetune.defaults.checkpoint_every=5", "finetune.defaults.schedule.warmup_steps=2",
         "evaluate.models=[base,finetuned]", "evaluate.max_blocks=16", "evaluate.generation_samples=8"]


def test_licence_assistant_answers_are_scored_and_shown(tmp_path):
    import corpus

    data = tmp_path / "data"
    corpus.build(str(data), {"general": 20_000, "legal": 150_000, "code": 20_000, "docs": 20_000})
    built = subprocess.run([sys.executable, str(REPO / "examples" / "licences.py"), str(data), "--max-examples", "800"],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    sets = [f"storage={tmp_path / 'runs'}", f"pretrain.dataset.path={data / 'legal.jsonl'}",
            f"evaluate.lm_eval.include_path={data / 'tasks'}", "evaluate.lm_eval.limit=40",
            *[f"finetune.domains.{i}.dataset.path={data / 'licences.jsonl'}" for i in (0, 1)], *SHORT]
    out = run_cli("run", str(REPO / "examples" / "licence_assistant.yaml"), *[a for s in sets for a in ("--set", s)],
                  timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [run_dir] = list((tmp_path / "runs" / "licence-assistant").iterdir())
    assert RunRecord.load(str(run_dir)).state is RunState.SUCCEEDED
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["domains"]) == {"licences", "licences-lora"}
    record = RunRecord.load(str(run_dir))
    from branchout.stages.prepare.blocks import fetch_member

    with open(fetch_member(record.job("data/licences").outputs["uri"], "heldout.jsonl")) as f:
        references = [json.loads(line)["reference"] for line in f][:8]
    assert len(references) == 8
    report = (run_dir / "report.md").read_text()
    for name, row in metrics["domains"].items():
        assert set(row["exact_match"]) == set(row["rouge_l"]) == set(row["exact_match_ci"]) == {"base", "finetuned"}
        assert row["questions"] == 8
        for model, em in row["exact_match"].items():  # a share of 8 answers, inside its interval
            assert em * 8 == round(em * 8) and row["exact_match_ci"][model][0] <= em <= row["exact_match_ci"][model][1]
        # the majority baseline, recomputed here the plain way: for each question, the answer
        # most common among the other 7 references (ties: alphabetically first)
        normal = [" ".join(r.split()).casefold() for r in references]
        baseline = []
        for i, ref in enumerate(normal):
            others = normal[:i] + normal[i + 1:]
            baseline.append(min(others, key=lambda a, o=others: (-o.count(a), a)) == ref)
        assert row["majority"]["exact_match"] == sum(baseline) / 8, name
        assert f"| {name} | 8 | finetuned | {row['exact_match']['finetuned']:.1%} |" in report
    assert "## Answers" in report and "| majority answer (mostly `" in report
    samples = json.loads((run_dir / "eval" / "samples.json").read_text())
    first = samples["licences"][0]
    assert "Debian package" in first["prompt"] and first["prompt"].endswith("<|assistant|>\n")
    assert samples["licences-lora"][0]["prompt"] == first["prompt"]  # same data, same held-out prompts
    assert "## Generation samples" in report
    # evaluate.lm_eval: the harness's task from local files, on the base and both fine-tunes
    # (the LoRA one merged into its base), each its own job; the report's table
    assert set(metrics["lm_eval"]) == {"base", "finetune/licences", "finetune/licences-lora"}
    for model, tasks in metrics["lm_eval"].items():
        assert 0 <= tasks["licence_mc"]["acc"] <= 1 and tasks["licence_mc"]["acc_stderr"] > 0, (model, tasks)
    results = json.loads((run_dir / "lm_eval" / "licences-lora" / "results.json").read_text())
    assert results["results"]["licence_mc"]["sample_len"] == 40  # evaluate.lm_eval.limit
    assert "## Benchmarks (lm-evaluation-harness)" in report and "| finetune/licences | licence_mc | acc |" in report
