"""Instruction data: rendering, the loss mask, padding, the split by prompt, the cache, answer scores.

Real tokenizers (a byte-level BPE trained here on the licence Q&A set built from this
machine's Debian copyright files) and a real tiny Llama; no Ray.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from branchout.core.spec import DatasetSpec
from branchout.stages.job import DataJob
from branchout.stages.prepare.data import open_blocks, prepare
from branchout.stages.prepare.instruct import (
    DEFAULT_CHAT_TEMPLATE,
    PAD,
    PROMPT,
    RESPONSE,
    encode_example,
    model_inputs,
    open_roles,
    prompt_key,
    with_chat_template,
)
from branchout.stages.prepare.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer
from branchout.storage.checkpoint import publish_dir

from conftest import TINY


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """(licences.jsonl, a published tokenizer dir trained on it)."""
    import licences

    root = tmp_path_factory.mktemp("qa")
    licences.build(str(root / "data"), max_examples=600)
    path = root / "data" / "licences.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    train_tokenizer([r["prompt"] + " " + r["response"] for r in rows] * 2, 600, 2, str(root / "tok-work"))
    publish_dir(str(root / "tok-work"), str(root / "tokenizer"))
    return path, str(root / "tokenizer")


def _tok(qa):
    return with_chat_template(load_tokenizer(qa[1]))


PAIR = [{"role": "user", "content": "Which licence covers debian/* in the Debian package bash?"},
        {"role": "assistant", "content": "GPL-3+"}]


def test_prompt_tokens_get_label_minus_100_and_answer_tokens_their_ids(qa):
    tok = _tok(qa)
    ids, roles = encode_example(tok, PAIR, 64)
    inputs = model_inputs((torch.from_numpy(ids)[None], torch.from_numpy(roles)[None]), "cpu")
    labels = inputs["labels"][0]
    answer = roles == RESPONSE
    assert (labels[torch.from_numpy(~answer)] == -100).all()
    assert torch.equal(labels[torch.from_numpy(answer)], torch.from_numpy(ids[answer]))
    # the scored tokens are exactly the answer and the end-of-turn EOS, nothing of the prompt
    assert tok.decode(ids[answer].tolist()) == "GPL-3+" + tok.eos_token
    assert tok.decode(ids[roles == PROMPT].tolist()) == tok.apply_chat_template(
        PAIR[:1], tokenize=False, add_generation_prompt=True)


def test_padding_is_never_attended_and_never_scored(qa):
    from branchout.stages.training.model import build_config, build_model

    tok = _tok(qa)
    ids, roles = encode_example(tok, PAIR, 64)
    assert (roles[-5:] == PAD).all() and (ids[roles == PAD] == tok.pad_token_id).all()
    inputs = model_inputs((torch.from_numpy(ids)[None], torch.from_numpy(roles)[None]), "cpu")
    assert torch.equal(inputs["attention_mask"][0].bool(), torch.from_numpy(roles != PAD))
    model = build_model(build_config("llama", TINY["model"]["config"], len(tok)), seed=0).eval()
    with torch.no_grad():
        loss = model(**inputs).loss
        noisy = ids.copy()
        noisy[roles == PAD] = np.arange((roles == PAD).sum()) % len(tok)  # other tokens where the padding is
        other = model(**model_inputs((torch.from_numpy(noisy)[None], torch.from_numpy(roles)[None]), "cpu")).loss
    assert torch.allclose(loss, other)


def test_rows_are_cut_at_seq_len_and_an_answer_beyond_it_drops_the_example(qa):
    tok = _tok(qa)
    prompt_len = int((encode_example(tok, PAIR, 64)[1] == PROMPT).sum())
    ids, roles = encode_example(tok, PAIR, prompt_len + 1)  # room for the answer's first token only
    assert len(ids) == prompt_len + 1 and roles[-1] == RESPONSE
    assert encode_example(tok, PAIR, prompt_len) is None


def test_every_assistant_turn_of_a_chat_is_scored_and_nothing_else(qa):
    tok = _tok(qa)
    chat = [{"role": "system", "content": "Answer with an SPDX identifier."}, *PAIR,
            {"role": "user", "content": "And most of the package?"}, {"role": "assistant", "content": "GPL-3+"}]
    ids, roles = encode_example(tok, chat, 128)
    assert tok.decode(ids[roles == RESPONSE].tolist()) == ("GPL-3+" + tok.eos_token) * 2
    assert tok.decode(ids[roles != PAD].tolist()) == tok.apply_chat_template(chat, tokenize=False)


def test_the_default_template_is_added_to_a_copy_and_saved_with_the_tokenizer(qa, tmp_path):
    plain = load_tokenizer(qa[1])
    templated = with_chat_template(plain)
    assert plain.chat_template is None and templated.chat_template == DEFAULT_CHAT_TEMPLATE
    templated.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).chat_template == DEFAULT_CHAT_TEMPLATE
    assert with_chat_template(templated) is templated  # a tokenizer's own template is kept


def test_the_same_prompt_is_always_on_the_same_side(qa, tmp_path):
    path, tok_dir = qa
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    twice = rows + [{"prompt": r["prompt"], "response": r["response"] + " (again)"} for r in rows]
    data = tmp_path / "twice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in twice))
    info = prepare(DataJob(dataset=DatasetSpec(path=str(data), prompt_column="prompt", response_column="response"),
                           tokenizer_uri=tok_dir, tokenizer_hash=tokenizer_hash(tok_dir), seq_len=64,
                           heldout_fraction=0.2, split_seed=0, cache_root=str(tmp_path / "cache")))
    tok = _tok(qa)

    def prompts(side):
        ids, roles = open_blocks(info.uri, side)[:], open_roles(info.uri, side)[:]
        return [tok.decode(i[r == PROMPT].tolist()) for i, r in zip(ids, roles, strict=True)]

    train, held = prompts("train"), prompts("heldout")
    assert held and not set(train) & set(held)
    assert len(train) + len(held) == len(twice) - info.examples_dropped
    assert prompt_key([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "q"


def test_instruction_data_is_prepared_once_and_reused_from_the_cache(qa, tmp_path):
    path, tok_dir = qa
    ds = DatasetSpec(path=str(path), prompt_column="prompt", response_column="response")
    first = prepare(DataJob(dataset=ds, tokenizer_uri=tok_dir, tokenizer_hash=tokenizer_hash(tok_dir),
                            seq_len=64, heldout_fraction=0.2, split_seed=0, cache_root=str(tmp_path / "cache")))
    again = prepare(DataJob(dataset=ds, tokenizer_uri=tok_dir, tokenizer_hash=tokenizer_hash(tok_dir),
                            seq_len=64, heldout_fraction=0.2, split_seed=0, cache_root=str(tmp_path / "cache")))
    assert first.kind == "instruct" and not first.cached and again.cached and again.uri == first.uri
    roles = open_roles(first.uri, "train")
    assert roles.shape == (first.train_blocks, 64)
    assert ((roles[:] == RESPONSE).sum(axis=1) > 0).all()  # every row has something to learn
    held = (tmp_path / "cache").glob("*/heldout.jsonl")
    reference = json.loads(next(held).read_text().splitlines()[0])
    assert reference["messages"][-1]["role"] == "user" and reference["reference"]
    assert open_roles(first.uri, "heldout") is not None
    # a token stream of the same text has no roles: its training scores every token
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": json.loads(x)["prompt"] + " " + json.loads(x)["response"]}) + "\n"
                            for x in path.read_text().splitlines()))
    plain = prepare(DataJob(dataset=DatasetSpec(path=str(text)), tokenizer_uri=tok_dir,
                            tokenizer_hash=tokenizer_hash(tok_dir), seq_len=64, heldout_fraction=0.2,
                            split_seed=0, cache_root=str(tmp_path / "cache")))
    assert plain.kind == "text" and open_roles(plain.uri, "train") is None


def test_perplexity_of_instruction_data_counts_answer_tokens_only(qa, tmp_path):
    from branchout.stages.evaluation.evaluate import perplexity
    from branchout.stages.training.model import build_config, build_model

    path, tok_dir = qa
    info = prepare(DataJob(dataset=DatasetSpec(path=str(path), prompt_column="prompt", response_column="response"),
                           tokenizer_uri=tok_dir, tokenizer_hash=tokenizer_hash(tok_dir), seq_len=64,
                           heldout_fraction=0.2, split_seed=0, cache_root=str(tmp_path / "cache")))
    blocks, roles = open_blocks(info.uri, "heldout"), open_roles(info.uri, "heldout")
    model = build_model(build_config("llama", TINY["model"]["config"], len(_tok(qa))), seed=0)
    ppl, scored = perplexity(model, blocks, 4, 10, roles)
    assert scored == int((roles[:10][:, 1:] == RESPONSE).sum())
    assert 1 < ppl < 10 * len(_tok(qa))


def test_exact_match_and_rouge_l():
    from branchout.stages.evaluation.generation import exact_match, rouge_l

    assert exact_match(["GPL-2+ ", "mit"], ["GPL-2+", "MIT"]) == 1.0
    assert exact_match(["GPL-2", "BSD"], ["GPL-2+", "MIT"]) == 0.0
    assert rouge_l(["1998 Richard Braakman"], ["1998 Richard Braakman"]) == 1.0
    assert 0 < rouge_l(["1998 Richard Stallman"], ["1998 Richard Braakman"]) < 1
    assert rouge_l(["Expat"], ["GPL-2+"]) == 0.0


def test_the_multiple_choice_task_is_never_empty_and_never_holds_a_trained_question(tmp_path):
    """On a machine with fewer copyright files than the default Q&A size the task once came out
    empty (every example went to the Q&A set); its items come from the rows the set leaves out."""
    import licences

    counts = licences.build(str(tmp_path), max_examples=10**6)  # more than any machine has
    assert counts["choice_items"] > 0
    trained = {json.loads(line)["prompt"] for line in (tmp_path / "licences.jsonl").read_text().splitlines()}
    items = [json.loads(line) for line in (tmp_path / "licence_mc.jsonl").read_text().splitlines()]
    assert len(items) == counts["choice_items"] and not {i["question"] for i in items} & trained
