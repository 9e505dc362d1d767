"""Adapter farms in a pipeline (``finetune.farm: auto``): three LoRA domains train in one farm,
each still its own job; one of them diverges, is taken out of the farm and retried alone
from its newest checkpoint, and the other two finish in the farm untouched.

The tiny pipeline with every domain LoRA (8 steps, a checkpoint every 4); ``code``'s loss
is made non-finite at step 6 by a planned fault (``stages.training.faults``, once).
"""

from __future__ import annotations

import copy

import pytest

from branchout.orchestrator.run.state import JobState, RunRecord, RunState

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow


def test_three_lora_domains_train_in_one_farm_and_a_diverging_one_is_retried_alone(write_pipeline, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = copy.deepcopy(TINY)
    spec["pretrain"]["num_workers"] = 1  # the pretrain is not what this tests
    spec["pretrain"]["global_batch_size"] = 4
    spec["finetune"]["defaults"].update(method="lora", lora={"rank": 4, "alpha": 8}, max_retries=1,
                                        deepspeed={"precision": "fp32"})
    spec["evaluate"]["models"] = ["base", "finetuned"]
    path = write_pipeline(spec)

    plan = run_cli("plan", str(path))
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.count("farm-1 (one base for its members)") == 3

    out = run_cli("run", str(path), env={"BRANCHOUT_FAULTS": "finetune/code@6:nan"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = next((tmp_path / "runs" / "tiny").iterdir())
    record = RunRecord.load(str(run_dir))
    assert record.state is RunState.SUCCEEDED

    # legal and docs: trained in the farm, each its own succeeded job with its own adapter
    base = AutoModelForCausalLM.from_pretrained(run_dir / "pretrain" / "model")
    for domain in ("legal", "docs"):
        job = record.job(f"finetune/{domain}")
        assert job.state is JobState.SUCCEEDED and job.attempts == 1, job
        assert job.outputs["farm"] == "farm-1" and job.outputs["resumed_from"] == 0
        PeftModel.from_pretrained(base, run_dir / "finetune" / domain / "model")
        assert record.job(f"evaluate/{domain}").outputs["finetuned_ppl"] > 1
    # code: taken out of the farm at step 6, retried alone from its step-4 checkpoint
    code = record.job("finetune/code")
    assert code.state is JobState.SUCCEEDED and code.attempts == 2, code
    assert "taken out of farm-1" in code.history[0]["error"], code.history
    assert code.outputs["resumed_from"] == 4 and "farm" not in code.outputs
    PeftModel.from_pretrained(base, run_dir / "finetune" / "code" / "model")
    # the report names the farm and the members that finished in it
    report = (run_dir / "report.md").read_text()
    assert "Adapter farm farm-1: finetune/legal, finetune/docs trained together" in report
