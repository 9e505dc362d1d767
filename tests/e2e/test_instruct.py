"""Issue 16 done-when: a model branchout did not make, continued and taught to answer.

A tiny Llama built with transformers from a config and saved with ``save_pretrained``,
a tokenizer saved beside it with its own (ChatML-style) chat template, nothing of
branchout's. The pipeline continues pre-training it on plain text and fans out two
supervised fine-tunes on the licence Q&A set (built from this machine's Debian copyright
files): LoRA on one warm-pool worker, and a full fine-tune on two DeepSpeed workers (the
multi-worker path). Evaluation scores base, fine-tuned and scratch answers; the LoRA
fine-tune is exported merged and loads and generates with plain transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from branchout.orchestrator.run.state import JobState, RunRecord, RunState

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def foreign_model(folder: Path, texts: list[str]) -> Path:
    """An HF model directory made with transformers and tokenizers alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<s>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(fast), **TINY["model"]["config"], bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_foreign_model_continued_sft_fanout_scored_and_exported(corpus_dir, tmp_path):
    import licences
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    licences.build(str(tmp_path / "data"), max_examples=400)
    qa = tmp_path / "data" / "licences.jsonl"
    rows = [json.loads(x) for x in qa.read_text().splitlines()]
    general = [json.loads(x)["text"] for x in (corpus_dir / "general.jsonl").read_text().splitlines()]
    model_dir = foreign_model(tmp_path / "hf-model", general + [r["prompt"] + " " + r["response"] for r in rows])

    instruct = {"path": str(qa), "prompt_column": "prompt", "response_column": "response"}
    spec = yaml.safe_load(yaml.safe_dump(TINY))
    spec.update(name="sft", storage=str(tmp_path / "runs"), model={"path": str(model_dir)})
    spec.pop("tokenizer")  # the model's own tokenizer
    spec["pretrain"].update(dataset={"path": str(corpus_dir / "general.jsonl")}, steps=6, num_workers=1,
                            checkpoint_every=3, deepspeed={"zero_stage": 0, "precision": "fp32"})
    spec["finetune"]["defaults"].update(seq_len=64, steps=8)
    spec["finetune"]["domains"] = [
        # a LoRA update this short moves little at the full fine-tune's rate
        {"name": "qa-lora", "dataset": instruct, "method": "lora", "lora": {"rank": 4, "alpha": 8},
         "optimizer": {"lr": 1.0e-2}},
        # two ZeRO-3 workers of one CPU each beside warm runners, on 2 CPUs: the mix that once
        # deadlocked (idle runners held both CPUs), and the multi-worker ZeRO-3 fine-tune path
        {"name": "qa-full", "dataset": instruct, "method": "full", "num_workers": 2, "micro_batch_size": 2,
         "resources_per_worker": {"cpu": 1}, "deepspeed": {"zero_stage": 3, "precision": "fp32"}}]
    spec["evaluate"].update(generation_samples=4, max_new_tokens=8)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))

    out = run_cli("run", str(path), timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [run_dir] = list((tmp_path / "runs" / "sft").iterdir())
    record = RunRecord.load(str(run_dir))
    assert record.state is RunState.SUCCEEDED, record.error
    assert all(j.state is JobState.SUCCEEDED for j in record.jobs.values()), record.jobs
    assert record.job("pretrain").outputs["resumed_from"] == 0  # it trained (steps: 0 would import)

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for name in ("qa-lora", "qa-full"):
        row = metrics["domains"][name]
        assert row["data"] == "instruction"
        for metric in ("exact_match", "rouge_l"):
            assert set(row[metric]) == {"base", "finetuned", "scratch"}, row
            assert all(0 <= v <= 1 for v in row[metric].values())
        assert row["finetuned_ppl"] < row["base_ppl"], row  # the answers' perplexity, after SFT
    samples = json.loads((run_dir / "eval" / "samples.json").read_text())
    assert samples["qa-lora"][0]["prompt"].startswith("<|im_start|>user\n")  # the model's own template
    assert set(samples["qa-lora"][0]["answers"]) == {"base", "finetuned", "scratch"}
    report = (run_dir / "report.md").read_text()
    assert "## Generation samples" in report and "ROUGE-L (base / ft / scratch)" in report

    exported = tmp_path / "exported"
    out = run_cli("export", run_dir.name, "--domain", "qa-lora", "--out", str(exported), "--merge")
    assert out.returncode == 0, out.stdout + out.stderr
    model = AutoModelForCausalLM.from_pretrained(exported)
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok.chat_template == CHATML
    prompt = tok.apply_chat_template([{"role": "user", "content": rows[0]["prompt"]}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
