"""The report says when a fine-tune is worse than a baseline, and shows what the models answered."""

from __future__ import annotations

import json

from branchout.orchestrator.run.report import findings, metrics_row, write_report
from branchout.orchestrator.run.state import JobRecord, RunRecord


def _outputs(**scores):
    return {"base_ppl": 9.0, "finetuned_ppl": 6.0, "scratch_ppl": 12.0, "heldout_tokens": 300, **scores}


def test_instruction_rows_carry_exact_match_and_rouge_l_per_model():
    row = metrics_row(_outputs(base_exact_match=0.0, finetuned_exact_match=0.5, scratch_exact_match=0.25,
                               base_rouge_l=0.1, finetuned_rouge_l=0.6, scratch_rouge_l=0.3), "lora", "instruct")
    assert row["exact_match"] == {"base": 0.0, "finetuned": 0.5, "scratch": 0.25}
    assert row["rouge_l"] == {"base": 0.1, "finetuned": 0.6, "scratch": 0.3}
    assert row["data"] == "instruction" and row["transfer_gain"] == 1 - 6 / 9
    plain = metrics_row(_outputs(), "full", "text")
    assert "exact_match" not in plain and plain["data"] == "text"


def test_a_better_fine_tune_has_no_findings():
    row = metrics_row(_outputs(base_rouge_l=0.1, finetuned_rouge_l=0.6, scratch_rouge_l=0.3), "full", "instruct")
    assert findings({"domains": {"legal": row}}) == []


def test_worse_than_scratch_by_perplexity_says_so_and_suggests_more_steps():
    row = metrics_row(_outputs(finetuned_ppl=13.0, base_ppl=15.0), "lora", "text")
    [line] = findings({"domains": {"legal": row}})
    assert line.startswith("legal: the fine-tune is worse than the from-scratch model "
                           "(held-out perplexity 13.00 vs the from-scratch model's 12.00)")
    assert "more fine-tune steps" in line and "lora.rank" in line and "more domain data" in line


def test_worse_than_the_base_by_rouge_suggests_a_lower_learning_rate():
    row = metrics_row(_outputs(base_rouge_l=0.5, finetuned_rouge_l=0.2, scratch_rouge_l=0.1), "full", "instruct")
    [line] = findings({"domains": {"qa": row}})
    assert "worse than the base model (ROUGE-L 20% vs the base model's 50%)" in line
    assert "lower learning rate" in line and "lora.rank" not in line


def test_report_shows_findings_scores_and_the_same_prompts_for_every_model(tmp_path):
    record = RunRecord(run_id="r1", pipeline="p", run_uri=str(tmp_path), spec_hash="x")
    for name in ("pretrain", "finetune/qa", "scratch/qa"):
        record.jobs[name] = JobRecord(name)
    row = metrics_row(_outputs(finetuned_ppl=10.0, base_exact_match=0.0, finetuned_exact_match=0.5,
                               base_rouge_l=0.2, finetuned_rouge_l=0.7), "full", "instruct")
    samples = {"qa": [{"prompt": "<|user|>\nWhich licence covers src/* in curl?\n<|assistant|>\n",
                       "reference": "curl", "answers": {"base": "", "finetuned": "curl"}}]}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "samples.json").write_text(json.dumps(samples))
    write_report(record, {"domains": {"qa": row}})
    md = (tmp_path / "report.md").read_text()
    assert "| 0% / 50% | 20% / 70% |" in md
    assert "**Worse than a baseline.** qa: the fine-tune is worse than the base model" in md
    assert "prompt: `<|user|> ⏎ Which licence covers src/* in curl? ⏎ <|assistant|> ⏎ `" in md
    assert "   - base: `(empty)`" in md and "   - finetuned: `curl`" in md
    html = (tmp_path / "report.html").read_text()
    assert "Generation samples" in html and "Worse than a baseline." in html and "&lt;|user|&gt;" in html


def test_report_says_what_decontamination_moved_per_dataset(tmp_path):
    record = RunRecord(run_id="r2", pipeline="p", run_uri=str(tmp_path), spec_hash="x")
    record.jobs["data/pretrain"] = JobRecord("data/pretrain", outputs={"train_docs": 1200, "heldout_docs": 59})
    record.jobs["data/legal"] = JobRecord("data/legal", outputs={
        "train_docs": 180, "heldout_docs": 14, "heldout_moved_near_duplicates": 7,
        "heldout_dropped_pretraining_overlap": 2})
    write_report(record, {"domains": {}})
    md = (tmp_path / "report.md").read_text()
    assert "## Held-out split" in md
    assert "| legal | 180 | 14 | 7 | 2 |" in md and "| pretrain | 1,200 | 59 | 0 | 0 |" in md
    assert "<h2>Held-out split</h2>" in (tmp_path / "report.html").read_text()


def test_cross_scores_join_the_evaluations_and_name_a_fine_tune_that_forgot(tmp_path):
    """eval/metrics.json's ``cross``: own-domain scores from the evaluation jobs, the rest from
    the cross jobs; a fine-tune whose general-text perplexity rose past the threshold is named."""
    from branchout.core.graph import build_graph
    from branchout.orchestrator.config.loader import load_spec
    from branchout.orchestrator.run.driver import create_run
    from branchout.orchestrator.run.report import cross_matrix, forgetting

    from conftest import REPO

    spec = load_spec(REPO / "examples" / "quickstart.yaml")
    spec.storage = str(tmp_path / "runs")
    graph = build_graph(spec)
    record = create_run(spec, graph, "r1")
    evaluations = {f"evaluate/{d}": {"base_ppl": 40.0, "finetuned_ppl": 10.0 + i, "scratch_ppl": 30.0}
                   for i, d in enumerate(graph.domains)}
    record.jobs["cross/base"].outputs = {"ppl": {"base": {"general": 20.0}}}
    for d in graph.domains:
        others = {o: 50.0 for o in graph.domains if o != d}
        # legal's fine-tune forgets: 26 vs the base's 20 on the general text
        record.jobs[f"cross/{d}"].outputs = {"ppl": {f"finetune/{d}": {"general": 26.0 if d == "legal" else 21.0,
                                                                       **others},
                                                     f"scratch/{d}": {"general": 60.0, **others}}}
    cross = cross_matrix(graph, record, evaluations)
    models = ["base", *(f"{k}/{d}" for d in graph.domains for k in ("finetune", "scratch"))]
    assert sorted(cross) == sorted(models) and list(cross)[0] == "base"
    assert cross["base"] == {"general": 20.0, "legal": 40.0, "code": 40.0, "docs": 40.0}
    assert list(cross["finetune/code"]) == ["general", "legal", "code", "docs"]
    assert cross["finetune/code"]["code"] == 11.0 and cross["finetune/code"]["legal"] == 50.0
    f = forgetting(cross, [f"finetune/{d}" for d in graph.domains], spec.evaluate.forgetting)
    assert f["forgot"] == ["finetune/legal"] and f["general_ppl_vs_base"]["finetune/legal"] == 1.3

    (tmp_path / "runs" / "quickstart" / "r1" / "eval").mkdir(parents=True)
    write_report(record, {"domains": {}, "cross": cross, "forgetting": f})
    run = tmp_path / "runs" / "quickstart" / "r1"
    md = (run / "report.md").read_text()
    assert ("**Forgot the general text.** finetune/legal: general-text perplexity 26.00 vs the base's 20.00 "
            "(+30%, more than evaluate.forgetting = 10%)") in md
    assert "finetune/code: general" not in md
    assert "## Perplexity of every model on every held-out set" in md and (run / "eval" / "cross.png").exists()
    html = (run / "report.html").read_text()
    assert "<h2>Perplexity of every model on every held-out set</h2>" in html
    assert "loss_curves.png</h2>" not in html  # headings say what a plot shows, not its file


def _answered(ft: float, ft_ci: list[float], scratch: float, scratch_ci: list[float], majority: float,
              majority_ci: list[float]) -> dict:
    return metrics_row(_outputs(base_exact_match=0.0, base_exact_match_ci=[0.0, 0.02], finetuned_exact_match=ft,
                                finetuned_exact_match_ci=ft_ci, scratch_exact_match=scratch,
                                scratch_exact_match_ci=scratch_ci, majority_exact_match=majority,
                                majority_exact_match_ci=majority_ci, majority_answer="gpl-2+", questions=200),
                       "full", "instruct")


def test_answers_stand_beside_scratch_and_the_majority_answer_with_intervals(tmp_path):
    from branchout.orchestrator.run.report import answer_findings, answer_rows

    clear = _answered(0.40, [0.33, 0.47], 0.20, [0.15, 0.26], 0.05, [0.03, 0.09])
    assert clear["questions"] == 200 and clear["majority"]["answer"] == "gpl-2+"
    assert clear["exact_match_ci"]["finetuned"] == [0.33, 0.47]
    rows = answer_rows({"domains": {"qa": clear}})
    assert [r[2] for r in rows] == ["base", "finetuned", "scratch", "majority answer (mostly `gpl-2+`)"]
    assert rows[2][3:] == ["20.0%", "15.0%-26.0%", "beats"] and rows[3][5] == "beats"
    assert answer_findings({"domains": {"qa": clear}}) == []
    # above scratch only within the intervals, and below the majority answer: both said
    close = _answered(0.22, [0.17, 0.28], 0.20, [0.15, 0.26], 0.25, [0.20, 0.31])
    assert [r[5] for r in answer_rows({"domains": {"qa": close}})][2:] == ["higher, within noise", "does not beat"]
    said = answer_findings({"domains": {"qa": close}})
    assert said[0].startswith("qa: the fine-tune's exact match is above but within noise of the from-scratch "
                              "model's (22.0% vs 20.0%, 200 questions)")
    assert said[1].startswith("qa: the fine-tune's exact match is not above the majority answer's (22.0% vs 25.0%")
    record = RunRecord(run_id="r1", pipeline="p", run_uri=str(tmp_path), spec_hash="x")
    record.jobs["finetune/qa"] = JobRecord("finetune/qa")
    write_report(record, {"domains": {"qa": close}})
    md = (tmp_path / "report.md").read_text()
    assert "## Answers" in md and "| qa | 200 | scratch | 20.0% | 15.0%-26.0% | higher, within noise |" in md
    assert "**Answers no better than a baseline.** qa: the fine-tune's exact match is not above" in md
    assert "Answers" in (tmp_path / "report.html").read_text()


def test_wilson_interval_and_the_leave_one_out_majority_answer():
    from branchout.stages.evaluation.generation import exact_hits, majority_answers, wilson

    lo, hi = wilson(0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.28  # not empty at 0 hits
    lo, hi = wilson(100, 200)
    assert abs(lo - 0.4314) < 1e-3 and abs(hi - 0.5686) < 1e-3
    assert wilson(10, 10)[1] == 1.0
    refs = ["GPL-2+", "gpl-2+ ", "MIT", "MIT", "MIT", "BSD"]
    # each question gets the others' commonest answer; a two-way tie goes to the alphabetically first
    assert majority_answers(refs) == ["mit", "mit", "gpl-2+", "gpl-2+", "gpl-2+", "mit"]
    assert exact_hits(majority_answers(refs), refs) == 0  # its own label never counts for it
    assert exact_hits(majority_answers(["a", "a", "a", "b"]), ["a", "a", "a", "b"]) == 3
