"""Instruction data: prompt/response pairs or chat messages, one example per row.

A domain whose dataset names ``prompt_column``/``response_column`` or ``messages_column``
is a supervised fine-tune, not a token stream. Each example is rendered with the
tokenizer's chat template (``DEFAULT_CHAT_TEMPLATE`` when it has none; the trained model's
tokenizer is saved with the template it was trained on, so generation uses the same
format), tokenized, cut to ``seq_len`` and right-padded into a row of its own. Nothing is
packed across examples, so no example attends to another. Each token gets a *role*:

    PAD (0)       padding: never attended (attention mask 0), never scored
    PROMPT (1)    the template and everything but the assistant's answers: attended, not scored
    RESPONSE (2)  the assistant's answers and the template's end-of-turn token: scored

The loss (``model_inputs``: labels -100 outside RESPONSE) and the held-out perplexity are
therefore over response tokens only. An example whose answer starts beyond ``seq_len`` has
nothing to learn from and is dropped (``examples_dropped``).

The held-out split hashes the *prompt* (``prompt_key``: everything before the last
answer), so a prompt asked twice with different answers is never on both sides.

Layout of a prepared instruction dataset (``<cache>/data/<key>/``, published with a
manifest like packed blocks, read through ``stages.prepare.blocks.open_blocks``)::

    meta.json                 "kind": "instruct", counts, seq_len, dtype, shards per side
    00000-train.bin …         [examples, seq_len] token ids, padded with the pad id
    00000-train_roles.bin …   [examples, seq_len] roles, the same rows
    00000-heldout*.bin …      the held-out side, likewise
    heldout.jsonl             the first ``HELDOUT_PROMPTS`` held-out prompts (messages) with
                              their reference answers: the evaluation's generation prompts

Limits: examples are rendered in the data job's one process (chat templates are Jinja,
a transformers feature), at thousands of examples a second, which suits instruction sets
(thousands to a few million examples), not pretraining corpora. The pretraining corpus is
not a decontamination reference here: the split is by prompt, and what is scored (answers)
is short.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from branchout.core.spec import DatasetSpec
from branchout.stages.prepare.units import DataError

PAD, PROMPT, RESPONSE = 0, 1, 2
INSTRUCT_VERSION = 1  # bump when rendering or layout changes: old caches are not reused
HELDOUT_PROMPTS = 256  # evaluate.generation_samples is at most this
SAMPLE_ROWS = 1000  # rows preflight looks at for empty columns

# Role markers on their own line, the answer closed by the EOS token: generation stops
# where the answer ends, and the same EOS the pretraining stream used between documents
# tells the model "done".
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class TemplateError(DataError):
    """The chat template does not render a conversation's prefix as a prefix of it."""


# ---- rendering ----------------------------------------------------------------------


def with_chat_template(tokenizer):
    """``tokenizer`` if it has a chat template, else a copy carrying ``DEFAULT_CHAT_TEMPLATE``.

    A copy, because a warm-pool runner shares one tokenizer between jobs: a plain-text
    domain trained after this one must not be exported with a template it never saw.
    """
    if tokenizer.chat_template:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def render(tokenizer, messages: list[dict], generation: bool) -> str:
    """The conversation as text; ``generation`` adds the cue for the assistant's answer.

    Raises:
        TemplateError: the template refused the conversation (e.g. a role it does not know).
    """
    from jinja2 import TemplateError as JinjaError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except JinjaError as e:
        roles = ", ".join(dict.fromkeys(m["role"] for m in messages))
        raise TemplateError(f"the tokenizer's chat template refused a conversation with roles {roles} "
                            f"({' '.join(str(e).split())[:160]})") from None


def encode_example(tokenizer, messages: list[dict], seq_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(token ids, roles), each ``seq_len`` long, or None when no answer token fits.

    Every assistant message is a RESPONSE: the text the template adds between the
    conversation so far (with the generation cue) and the conversation including it. The
    context before it is tokenized on its own, exactly as a prompt is at generation time.

    Raises:
        TemplateError: the template renders a prefix that the full conversation does not start with.
    """
    ids: list[int] = []
    roles: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        cue = render(tokenizer, messages[:i], generation=True) if i else ""
        full = render(tokenizer, messages[:i + 1], generation=False)
        if not (cue.startswith(done) and full.startswith(cue)):
            raise TemplateError("the tokenizer's chat template does not render a conversation's beginning as "
                                "the beginning of the conversation; give the tokenizer a template that does")
        for text, role in ((cue[len(done):], PROMPT), (full[len(cue):], RESPONSE)):
            piece = tokenizer.encode(text, add_special_tokens=False) if text else []
            ids += piece
            roles += [role] * len(piece)
        done = full
        if len(ids) >= seq_len:
            break
    ids, roles = ids[:seq_len], roles[:seq_len]
    if RESPONSE not in roles:
        return None
    pad = seq_len - len(ids)
    return (np.array(ids + [tokenizer.pad_token_id] * pad, np.int64),
            np.array(roles + [PAD] * pad, np.int64))


def prompt_key(messages: list[dict]) -> str:
    """What the held-out split hashes: everything before the last answer."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    context = messages[:last]
    if len(context) == 1 and context[0]["role"] == "user":
        return context[0]["content"]  # a prompt/response pair: the prompt's own text
    return json.dumps(context, sort_keys=True, ensure_ascii=False)


def split_prompt(messages: list[dict]) -> tuple[list[dict], str]:
    """(the messages before the last answer, the last answer): a generation prompt and its reference."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def model_inputs(batch, device) -> dict:
    """Keyword arguments of the model's forward for a training or scoring batch.

    A plain tensor is a packed token-stream block: every token is scored. An
    ``(ids, roles)`` pair is instruction rows: padding is masked out of attention and
    only RESPONSE tokens are labels (-100 is the label HF causal LMs skip).
    """
    import torch

    def moved(x):
        # From pinned host memory the copy is queued behind the GPU's work instead of waiting
        # for it: the host goes on to launch the step's kernels (pageable memory would block).
        if str(device).startswith("cuda"):
            x = x.pin_memory()
        return x.to(device, non_blocking=True)

    if not isinstance(batch, tuple):
        batch = moved(batch)
        return {"input_ids": batch, "labels": batch}
    ids, roles = (moved(x) for x in batch)
    return {"input_ids": ids, "attention_mask": (roles != PAD).long(),
            "labels": torch.where(roles == RESPONSE, ids, torch.full_like(ids, -100))}


def open_roles(data_uri: str, side: str):
    """The roles of an instruction dataset's ``side`` as ``[examples, seq_len]``, or None for
    packed token-stream data."""
    from branchout.stages.prepare.blocks import open_blocks

    blocks = open_blocks(data_uri, side)
    return open_blocks(data_uri, f"{side}_roles") if is_instruct_meta(blocks.meta) else None


def is_instruct_meta(meta: dict) -> bool:
    return meta.get("kind") == "instruct"


def heldout_prompts(data_uri: str, count: int) -> list[dict]:
    """The first ``count`` held-out prompts: ``{"messages": [...], "reference": str}``."""
    from branchout.stages.prepare.blocks import fetch_member

    with open(fetch_member(data_uri, "heldout.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(count), f, strict=False)]


# ---- reading ------------------------------------------------------------------------


def unit_conversations(unit, ds: DatasetSpec) -> Iterator[list[list[dict] | None]]:
    """Each row of one read unit as messages, in batches; None for a row with nothing to
    learn (an empty prompt or answer, no assistant message).

    Raises:
        DataError: a missing column (naming the setting), or one of the wrong type.
    """
    from branchout.stages.prepare.documents import unit_columns

    if ds.messages_column:
        for values in unit_columns(unit, ds.messages_column, "messages_column"):
            _check_type(unit.path, ds.messages_column, values, _is_messages, "lists of {role, content} messages")
            yield [_conversation(row) for row in values.to_pylist()]
        return
    prompts = unit_columns(unit, ds.prompt_column, "prompt_column")
    answers = unit_columns(unit, ds.response_column, "response_column")
    for p, r in zip(prompts, answers, strict=True):  # the same unit read twice: the batches line up
        _check_type(unit.path, ds.prompt_column, p, _is_text, "text")
        _check_type(unit.path, ds.response_column, r, _is_text, "text")
        yield [[{"role": "user", "content": a}, {"role": "assistant", "content": b}]
               if _filled(a) and _filled(b) else None for a, b in zip(p.to_pylist(), r.to_pylist(), strict=True)]


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_null(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_messages(t: pa.DataType) -> bool:
    if pa.types.is_null(t):
        return True
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    names = {t.value_type.field(i).name for i in range(t.value_type.num_fields)}
    return {"role", "content"} <= names


def _check_type(path: str, column: str, values: pa.Array, ok, want: str) -> None:
    if not ok(values.type):
        raise DataError(f"{path}: column {column!r} holds {values.type} values, not {want}")


def _filled(text) -> bool:
    return isinstance(text, str) and bool(text.strip())


def _conversation(row) -> list[dict] | None:
    if not row:
        return None
    messages = [{"role": str(m.get("role") or ""), "content": m.get("content") or ""} for m in row if m]
    if not any(m["role"] == "assistant" and _filled(m["content"]) for m in messages):
        return None
    return messages


def check_instruct_dataset(ds: DatasetSpec, seq_len: int, fraction: float, seed: int) -> str | None:
    """Preflight for instruction data: a problem line, or None.

    Reads rows until one training and one held-out example were seen (and at least
    ``SAMPLE_ROWS`` rows), so a large set costs its first read unit.

    Raises:
        DataError: a file cannot be read or lacks a column (naming both).
    """
    from branchout.stages.prepare.documents import plan_units, resolve_source
    from branchout.stages.prepare.split import is_heldout

    src = resolve_source(ds)
    if src.is_hub:
        return "hub"
    if src.builder == "text":
        setting = "messages_column" if ds.messages_column else "prompt_column"
        return f"{src.label}: plain text files have no columns for dataset.{setting}; use JSONL, Parquet or CSV"
    rows, usable = 0, 0
    sides = {False: 0, True: 0}
    for unit in plan_units(ds):
        for batch in unit_conversations(unit, ds):
            rows += len(batch)
            for messages in batch:
                if messages is not None:
                    usable += 1
                    sides[is_heldout(prompt_key(messages), seed, fraction)] += 1
            if rows >= SAMPLE_ROWS and min(sides.values()):
                break
        if rows >= SAMPLE_ROWS and min(sides.values()):
            break
    if rows == 0:
        return f"{src.label}: dataset is empty"
    if usable == 0:
        what = (f"column {ds.messages_column!r} has no conversation with a non-empty assistant message"
                if ds.messages_column else
                f"columns {ds.prompt_column!r} and {ds.response_column!r} have no row where both are non-empty")
        return f"{src.label}: {what} in its first {rows} rows"
    if sides[True] == 0:
        return (f"{src.label}: held-out split ({fraction:.0%} of {usable} prompts) holds no example; add data "
                "or raise evaluate.heldout_fraction")
    if sides[False] == 0:
        return f"{src.label}: every one of {usable} prompts is held out; add data"
    return None


# ---- preparing ----------------------------------------------------------------------


def template_of(tokenizer_dir: str) -> str:
    """The chat template examples of this tokenizer are rendered with."""
    from branchout.stages.prepare.tokenizer import load_tokenizer

    return with_chat_template(load_tokenizer(tokenizer_dir)).chat_template


def cache_key(fp: str, tok_hash: str, template: str, seq_len: int, fraction: float, seed: int,
              shard_blocks: int) -> str:
    payload = json.dumps(["instruct", INSTRUCT_VERSION, fp, tok_hash,
                          hashlib.sha256(template.encode()).hexdigest(), seq_len, fraction, seed, shard_blocks])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def write_examples(ds: DatasetSpec, tokenizer_dir: str, seq_len: int, fraction: float, seed: int, out: str,
                   shard_blocks: int, progress) -> dict:
    """Render, tokenize and write every example of ``ds`` into ``out``; returns meta.json's values.

    Raises:
        DataError: unreadable data, a template that cannot be split, or no training or no
            held-out example.
    """
    from branchout.stages.prepare.blocks import BlockWriter
    from branchout.stages.prepare.documents import plan_units, resolve_source
    from branchout.stages.prepare.split import is_heldout
    from branchout.stages.prepare.tokenizer import load_tokenizer

    tok = with_chat_template(load_tokenizer(tokenizer_dir))
    dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max else np.uint32
    writers = {side: (BlockWriter(out, side, seq_len, dtype, shard_blocks),
                      BlockWriter(out, f"{side}_roles", seq_len, dtype, shard_blocks)) for side in ("train", "heldout")}
    counts = {"train": 0, "heldout": 0, "dropped": 0, "skipped": 0, "tokens": 0}
    with open(os.path.join(out, "heldout.jsonl"), "w", encoding="utf-8") as prompts:
        kept_prompts = 0
        for unit in plan_units(ds):
            progress.unit({"bytes": unit.size, "node": "local"})
            for batch in unit_conversations(unit, ds):
                tokens_before = counts["tokens"]
                for messages in batch:
                    if messages is None:
                        counts["skipped"] += 1
                        continue
                    row = encode_example(tok, messages, seq_len)
                    if row is None:
                        counts["dropped"] += 1
                        continue
                    side = "heldout" if is_heldout(prompt_key(messages), seed, fraction) else "train"
                    ids, roles = row
                    writers[side][0].write(ids)
                    writers[side][1].write(roles)
                    counts[side] += 1
                    counts["tokens"] += int((roles != PAD).sum())
                    if side == "heldout" and kept_prompts < HELDOUT_PROMPTS:
                        context, reference = split_prompt(messages)
                        prompts.write(json.dumps({"messages": context, "reference": reference},
                                                 ensure_ascii=False) + "\n")
                        kept_prompts += 1
                progress.add(len(batch), counts["tokens"] - tokens_before)
    label = resolve_source(ds).label
    if counts["train"] == 0:
        raise DataError(f"{label}: no training example whose answer starts within {seq_len} tokens "
                        f"({counts['dropped']} too long); raise seq_len")
    if counts["heldout"] == 0:
        raise DataError(f"{label}: held-out split ({fraction:.0%} of {counts['train']} prompts) holds no "
                        "example; add data or raise evaluate.heldout_fraction")
    shards = {}
    for side, (ids_writer, roles_writer) in writers.items():
        shards[side], shards[f"{side}_roles"] = ids_writer.close(), roles_writer.close()
    return {"kind": "instruct", "seq_len": seq_len, "dtype": np.dtype(dtype).name,
            "train_blocks": counts["train"], "heldout_blocks": counts["heldout"],
            "train_roles_blocks": counts["train"], "heldout_roles_blocks": counts["heldout"],
            "train_docs": counts["train"], "heldout_docs": counts["heldout"], "tokens": counts["tokens"],
            "examples_dropped": counts["dropped"], "examples_skipped": counts["skipped"],
            "shard_blocks": shard_blocks, "shards": shards, "chat_template": tok.chat_template}


def prepare_examples(ds: DatasetSpec, tokenizer_dir: str, tok_hash: str, seq_len: int, fraction: float,
                     seed: int, cache_root: str, data_fingerprint: str, progress, shard_blocks: int):
    """``stages.prepare.data.prepare`` for instruction data: the cached copy, or a new one published.

    Returns:
        (the dataset's URI, its meta.json values, whether it came from the cache).

    Raises:
        DataError: as ``write_examples``.
    """
    from branchout import storage
    from branchout.storage import checkpoint

    key = cache_key(data_fingerprint, tok_hash, template_of(tokenizer_dir), seq_len, fraction, seed, shard_blocks)
    uri = storage.join(cache_root, key)
    if checkpoint.is_published(uri):
        try:
            return uri, json.loads(storage.read_text(storage.join(uri, "meta.json"))), True
        except (OSError, json.JSONDecodeError):
            pass  # an unreadable cache entry is rebuilt
    with tempfile.TemporaryDirectory(prefix="branchout-instruct-") as tmp:
        meta = write_examples(ds, tokenizer_dir, seq_len, fraction, seed, tmp, shard_blocks, progress)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        checkpoint.publish_dir(tmp, uri)
    return uri, meta, False

