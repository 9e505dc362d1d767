"""Starting from an existing model (`model.path`): validation, the plan, offline hub ids."""

from __future__ import annotations

import copy

import pytest

from branchout.orchestrator.config.loader import SpecError, load_spec
from branchout.orchestrator.config.plan import build_plan

from conftest import TINY


@pytest.fixture(scope="module")
def foreign_model(corpus_dir, tmp_path_factory):
    """A model directory branchout did not make: save_pretrained of a small Qwen2 and its tokenizer."""
    import json

    from transformers import AutoModelForCausalLM, Qwen2Config

    from branchout.stages.prepare.tokenizer import (
        load_tokenizer,
        special_token_ids,
        train_tokenizer,
    )

    root = tmp_path_factory.mktemp("foreign")
    texts = [json.loads(x)["text"] for x in (corpus_dir / "general.jsonl").read_text().splitlines()]
    train_tokenizer(texts, 600, 2, str(root / "tok"))
    tok = load_tokenizer(str(root / "tok"))
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=128,
                         **special_token_ids(tok))
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


def _spec(foreign_model, **model):
    spec = copy.deepcopy(TINY)
    spec["model"] = {"path": str(foreign_model), **model}
    del spec["tokenizer"]
    return spec


def test_a_model_directory_decides_architecture_and_tokenizer(write_pipeline, foreign_model):
    spec = load_spec(write_pipeline(_spec(foreign_model)))
    assert spec.tokenizer.path == str(foreign_model)  # the model's own tokenizer
    plan = build_plan(spec)
    assert plan.model_type == "qwen2" and plan.vocab_size == 600


def test_path_and_type_are_exclusive_and_steps_0_needs_a_path(write_pipeline, foreign_model):
    with pytest.raises(SpecError) as e:
        load_spec(write_pipeline(_spec(foreign_model, type="llama")))
    assert e.value.problems == ["model: give either `path` (start from an existing model) or `type`/`config` "
                                "(build a new one), not both: the model's config.json decides its architecture"]
    no_path = copy.deepcopy(TINY)
    no_path["pretrain"]["steps"] = 0
    with pytest.raises(SpecError) as e:
        load_spec(write_pipeline(no_path))
    assert e.value.problems == ["pretrain.steps: 0 skips pretraining, which needs an existing model to branch "
                                "from (model.path)"]
    skip = _spec(foreign_model)
    skip["pretrain"]["steps"] = 0
    assert build_plan(load_spec(write_pipeline(skip))).pretrain.steps == 0


def test_a_hub_id_offline_is_one_line(write_pipeline, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: an earlier test may have imported it
    # online, and each hub call would then wait out its network retries (~20 s) before failing
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = copy.deepcopy(TINY)
    spec["model"] = {"path": "some-org/some-model", "revision": "v1"}
    spec["tokenizer"] = {"vocab_size": 512}
    with pytest.raises(SpecError) as e:
        load_spec(write_pipeline(spec))
    [line] = e.value.problems
    assert line.startswith("model.path: 'some-org/some-model' is not a local directory and the Hugging Face hub "
                           "cannot provide it") and "huggingface-cli download some-org/some-model" in line
