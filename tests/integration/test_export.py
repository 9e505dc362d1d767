"""`branchout export`'s writer: merged LoRA, base + adapters, full fine-tunes, dtype casts."""

from __future__ import annotations

import json

import pytest
import torch

from branchout.stages.training.export import ExportError, export_finetune

from conftest import job_for, job_parts


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory):
    from branchout.stages.training.single_worker import run_single_worker

    parts = job_parts(tmp_path_factory.mktemp("export"), corpus_dir)
    lora, full = job_for(parts, "lora", "lora", steps=4), job_for(parts, "full", "full", steps=4)
    run_single_worker(lora)
    run_single_worker(full)
    return parts, lora, full


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_merged_lora_is_one_model_with_the_adapter_in_its_weights(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parts, lora, _ = trained
    [out] = export_finetune(lora.model_uri, lora.base_model_uri, "lora", "legal", str(tmp_path / "m"), merge=True)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora.base_model_uri), lora.model_uri)
    ids = AutoTokenizer.from_pretrained(out)("The licence is granted", return_tensors="pt")["input_ids"]
    assert torch.allclose(_logits(merged, ids), _logits(adapted, ids), atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(lora.base_model_uri)
    assert not torch.allclose(_logits(merged, ids), _logits(base, ids), atol=1e-4)  # the adapter did something
    assert merged.generate(input_ids=ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


def test_unmerged_lora_is_base_plus_adapter_layout(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, lora, _ = trained
    base_dir, adapter_dir = export_finetune(lora.model_uri, lora.base_model_uri, "lora", "legal", str(tmp_path / "s"))
    assert base_dir.endswith("/s/base") and adapter_dir.endswith("/s/adapters/legal")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    layout = json.loads((tmp_path / "s" / "branchout-export.json").read_text())
    assert layout["adapters"] == {"legal": "adapters/legal"} and "--enable-lora" in layout["serve"]


def test_full_finetune_cast_to_bf16(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    _, _, full = trained
    [out] = export_finetune(full.model_uri, full.base_model_uri, "full", "code", str(tmp_path / "f"), dtype="bf16")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ExportError, match="is not empty"):
        export_finetune(full.model_uri, None, "full", "code", str(tmp_path / "f"))
    with pytest.raises(ExportError, match="--dtype 'int4'"):
        export_finetune(full.model_uri, None, "full", "code", str(tmp_path / "g"), dtype="int4")
