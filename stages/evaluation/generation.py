"""Greedy answers to held-out prompts: what a model says, not only how surprised it is.

Perplexity says how well a model predicts the reference text; it does not say whether the
model, asked a question, answers it. For every scored model the evaluation job decodes
greedily (deterministic: the same weights give the same answer) from the same prompts:

- instruction domains: the first ``evaluate.generation_samples`` held-out prompts, rendered
  with the chat template the domain trained with and ending in the assistant cue; the
  answers are scored against the reference answers by **exact match** (equal after
  collapsing whitespace and case) and **ROUGE-L** F1 (longest common subsequence of words,
  ``rouge-score``'s implementation), each averaged over the prompts. Exact match carries a
  95% Wilson interval (a share of n questions: at n = 32 it spans ±15 points, at 200 about
  ±6), and beside the models stands the **majority answer**: for each question, the answer
  most common among the *other* held-out references (leave-one-out, so no question is scored
  with its own label), a floor that any model which learned something must clear;
- plain-text domains: the first half of as many held-out blocks, continued for
  ``max_new_tokens`` tokens; shown in the report next to the text that really followed,
  not scored (a continuation has no single right answer).

A prompt keeps its last ``max positions − max_new_tokens`` tokens, so prompt and answer fit
the model's positions. Prompts are decoded one at a time: no padding whose handling could
differ between models, and the count is bounded (``generation_samples`` ≤ 256).
"""

from __future__ import annotations

import math

import numpy as np

SHOWN = 3  # samples per domain kept for the report
SHOWN_CHARS = 400  # characters of a shown prompt, reference or answer


class Generations:
    """The prompts of one domain and every candidate's answers to them."""

    def __init__(self, data_uri: str, tokenizer_uri: str, heldout_blocks, instruct: bool, count: int,
                 max_new_tokens: int):
        from branchout.stages.prepare.instruct import heldout_prompts, render, with_chat_template
        from branchout.stages.prepare.tokenizer import load_tokenizer
        from branchout.storage.checkpoint import fetch_verified

        tok = load_tokenizer(fetch_verified(tokenizer_uri))
        self.instruct, self.max_new_tokens = instruct, max_new_tokens
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id
        self.tok = tok
        self.prompts: list[tuple[list[int], str, str]] = []  # (ids, prompt text, reference)
        if instruct:
            tok = with_chat_template(tok)
            for p in heldout_prompts(data_uri, count):
                text = render(tok, p["messages"], generation=True)
                self.prompts.append((tok.encode(text, add_special_tokens=False), text, p["reference"]))
        else:
            half = heldout_blocks.shape[1] // 2
            for row in np.asarray(heldout_blocks[:min(count, len(heldout_blocks))], dtype=np.int64):
                ids = row[:half].tolist()
                self.prompts.append((ids, self._text(ids), self._text(row[half:half + max_new_tokens].tolist())))
        self.answers: dict[str, list[str]] = {}

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def answer(self, name: str, model) -> dict[str, float]:
        """``model``'s answers to every prompt, kept under ``name``; for instruction data
        returns ``{"exact_match", "rouge_l"}`` over them."""
        self.answers[name] = [self._text(greedy(model, ids, self.max_new_tokens, self.eos, self.pad))
                              for ids, _, _ in self.prompts]
        if not self.instruct or not self.prompts:
            return {}
        references = [ref for _, _, ref in self.prompts]
        hits = exact_hits(self.answers[name], references)
        return {"exact_match": hits / len(references), "exact_match_ci": wilson(hits, len(references)),
                "rouge_l": rouge_l(self.answers[name], references)}

    def majority(self) -> dict:
        """The leave-one-out majority answer's exact match over the prompts (instruction data),
        with its interval, the answer it gives most and the number of questions; {} otherwise."""
        if not self.instruct or not self.prompts:
            return {}
        references = [ref for _, _, ref in self.prompts]
        answers = majority_answers(references)
        hits = exact_hits(answers, references)
        return {"majority_exact_match": hits / len(references), "majority_exact_match_ci": wilson(hits, len(references)),
                "majority_answer": min(set(answers), key=lambda a: (-answers.count(a), a)),
                "questions": len(references)}

    def shown(self) -> list[dict]:
        """The first ``SHOWN`` prompts with the reference and each candidate's answer."""
        return [{"prompt": _clip(text), "reference": _clip(ref),
                 "answers": {name: _clip(answers[i]) for name, answers in self.answers.items()}}
                for i, (_, text, ref) in enumerate(self.prompts[:SHOWN])]


def greedy(model, ids: list[int], max_new_tokens: int, eos_id: int, pad_id: int | None) -> list[int]:
    """The tokens ``model`` generates after ``ids``, greedily, up to EOS or ``max_new_tokens``."""
    import torch

    from branchout.stages.training.model import max_positions

    limit = max_positions(model.config)
    if limit is not None:
        ids = ids[-max(1, limit - max_new_tokens):]
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id if pad_id is not None else eos_id)
    return out[0, len(ids):].tolist()


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


def exact_hits(answers: list[str], references: list[str]) -> int:
    """How many answers equal their reference after collapsing whitespace and case."""
    return sum(_normal(a) == _normal(r) for a, r in zip(answers, references, strict=True))


def exact_match(answers: list[str], references: list[str]) -> float:
    """Share of answers equal to their reference after collapsing whitespace and case."""
    return exact_hits(answers, references) / len(references)


def wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of a share ``hits / n``: unlike the normal approximation it
    stays inside [0, 1] and is not empty at 0 or n hits, which small answer sets often have."""
    if n == 0:
        return [0.0, 1.0]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def majority_answers(references: list[str]) -> list[str]:
    """For each question, the reference most common among the others (normalised as exact
    match compares; ties to the alphabetically first, so the baseline is deterministic)."""
    from collections import Counter

    counts = Counter(_normal(r) for r in references)
    out = []
    for r in references:
        counts[_normal(r)] -= 1
        out.append(min(counts, key=lambda a: (-counts[a], a)) if len(references) > 1 else "")
        counts[_normal(r)] += 1
    return out


def rouge_l(answers: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 of the answers against their references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return sum(scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references, strict=True)) / len(references)


def _clip(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"
