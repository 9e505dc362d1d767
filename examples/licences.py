"""Build a licence Q&A set from Debian's machine-readable copyright files on this machine.

    python examples/licences.py examples/data        # licences.jsonl, ~1 MB, a second

It also writes a multiple-choice benchmark for ``evaluate.lm_eval``: ``licence_mc.jsonl``
(up to ``MC_ITEMS`` "Which licence covers …" questions about packages *after* those the
Q&A set takes, so no fine-tune trained on them, each with the true licence and three others)
and ``tasks/licence_mc.yaml``, an lm-evaluation-harness task reading that file by its
absolute path (``include_path: data/tasks`` in examples/licence_assistant.yaml).

Every Debian package documents its licensing in ``/usr/share/doc/<package>/copyright``;
most use the machine-readable format (DEP-5), stanzas of ``Field: value`` lines::

    Files: support/checkbashisms
    Copyright: 1998 Richard Braakman
    License: GPL-3+

Each ``Files`` stanza gives questions with short, checkable answers:

    "Which licence covers support/checkbashisms in the Debian package bash?"  → "GPL-3+"
    "Who holds the copyright of support/checkbashisms in the Debian package bash?"
                                                                             → "1998 Richard Braakman"

and a package's ``Files: *`` stanza "Which licence covers most of the Debian package bash?".
The output (``prompt``/``response`` JSONL) is deterministic for a given machine: packages
in name order, a prompt asked once (its first answer wins), at most ``MAX_PER_PACKAGE``
examples a package and ``--max-examples`` in all, answers of at most ``MAX_ANSWER_CHARS``. Files that are not DEP-5, and doc
directories that are symlinks to another package's, are skipped.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Iterator

DEFAULT_MAX_EXAMPLES = 6000
MAX_ANSWER_CHARS = 120
MAX_PATTERNS = 3  # file patterns named in one question
MAX_PER_PACKAGE = 8  # so a few packages with hundreds of stanzas (boost) do not make up the set
DOC_ROOT = "/usr/share/doc"
MC_ITEMS = 200  # questions of the multiple-choice task at most
MC_TASK = """task: licence_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def stanzas(text: str) -> list[dict[str, str]]:
    """The stanzas of a DEP-5 file: field name → value (continuation lines joined by newlines)."""
    out, current, field = [], {}, None
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            if current:
                out.append(current)
            current, field = {}, None
        elif line[0] in " \t":
            if field is not None:
                current[field] += "\n" + line.strip()
        elif ":" in line:
            field, _, value = line.partition(":")
            field = field.strip()
            current[field] = value.strip()
    if current:
        out.append(current)
    return out


def _first_line(value: str) -> str:
    return next((ln.strip() for ln in value.split("\n") if ln.strip() and ln.strip() != "."), "")


def _patterns(files: str) -> str:
    names = files.split()
    shown = " ".join(names[:MAX_PATTERNS])
    return shown + (f" (and {len(names) - MAX_PATTERNS} more)" if len(names) > MAX_PATTERNS else "")


def package_examples(package: str, text: str) -> Iterator[tuple[str, str]]:
    """(prompt, response) pairs of one package's copyright file; none if it is not DEP-5."""
    parts = stanzas(text)
    if not parts or "copyright-format" not in parts[0].get("Format", ""):
        return
    for stanza in parts[1:]:
        files, licence = stanza.get("Files"), _first_line(stanza.get("License", ""))
        if not files or not licence:
            continue
        if files.split() == ["*"]:
            yield f"Which licence covers most of the Debian package {package}?", licence
        else:
            yield f"Which licence covers {_patterns(files)} in the Debian package {package}?", licence
        holder = _first_line(stanza.get("Copyright", ""))
        if holder and holder.lower() not in ("none", "unknown"):
            where = "most of" if files.split() == ["*"] else f"{_patterns(files)} in"
            yield f"Who holds the copyright of {where} the Debian package {package}?", holder


def examples(doc_root: str = DOC_ROOT, max_examples: int = DEFAULT_MAX_EXAMPLES) -> list[dict[str, str]]:
    """Every package's examples in package order, each prompt once, at most ``max_examples``."""
    seen: set[str] = set()
    out = []
    for path in sorted(glob.glob(os.path.join(doc_root, "*", "copyright"))):
        folder = os.path.dirname(path)
        if os.path.islink(folder) or os.path.islink(path):
            continue  # another package's file under a second name
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        taken = 0
        for prompt, response in package_examples(os.path.basename(folder), text):
            if prompt in seen or len(response) > MAX_ANSWER_CHARS or taken >= MAX_PER_PACKAGE:
                continue
            seen.add(prompt)
            taken += 1
            out.append({"prompt": prompt, "response": response})
            if len(out) >= max_examples:
                return out
    return out


def choice_items(rows: list[dict[str, str]], licences: list[str], limit: int = MC_ITEMS) -> list[dict]:
    """Multiple-choice items of the licence questions in ``rows``: the true licence and three
    others of ``licences``, in an order drawn from the item's index (deterministic)."""
    import random

    out = []
    for row in rows:
        if not row["prompt"].startswith("Which licence") or len(out) >= limit:
            continue
        rng = random.Random(len(out))
        others = sorted({name for name in licences if name != row["response"]})
        if len(others) < 3:
            break
        choices = [row["response"], *rng.sample(others, 3)]
        rng.shuffle(choices)
        out.append({"question": row["prompt"], "choices": [f" {c}" for c in choices],
                    "answer": choices.index(row["response"])})
    return out


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def build(out_dir: str, max_examples: int = DEFAULT_MAX_EXAMPLES, doc_root: str = DOC_ROOT) -> dict[str, int]:
    """Write ``<out_dir>/licences.jsonl`` and the multiple-choice task (``licence_mc.jsonl``,
    ``tasks/licence_mc.yaml``); returns the example, byte and multiple-choice item counts."""
    everything = examples(doc_root, max_examples + 10 * MC_ITEMS)
    # the multiple-choice items come from packages the Q&A set leaves out: the last ones, as
    # many rows as 10 × MC_ITEMS or a fifth of what this machine has, whichever is fewer (a
    # machine with fewer than max_examples would otherwise leave none, and the task empty)
    reserve = min(10 * MC_ITEMS, len(everything) // 5)
    rows = everything[:min(max_examples, len(everything) - reserve)]
    unseen = everything[len(rows):]
    licences = [r["response"] for r in everything if r["prompt"].startswith("Which licence")]
    items = choice_items(unseen, licences)
    os.makedirs(os.path.join(out_dir, "tasks"), exist_ok=True)
    mc_path = os.path.abspath(os.path.join(out_dir, "licence_mc.jsonl"))
    _write_jsonl(mc_path, items)
    with open(os.path.join(out_dir, "tasks", "licence_mc.yaml"), "w", encoding="utf-8") as f:
        f.write(MC_TASK.format(path=json.dumps(mc_path)))
    path = os.path.join(out_dir, "licences.jsonl")
    _write_jsonl(path, rows)
    return {"examples": len(rows), "bytes": os.path.getsize(path), "choice_items": len(items)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=os.path.join(os.path.dirname(__file__), "data"))
    parser.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES)
    args = parser.parse_args(argv)
    stats = build(args.out_dir, args.max_examples)
    print(f"licences {stats['examples']:6d} examples {stats['bytes'] / 1e6:6.2f} MB -> "
          f"{os.path.join(args.out_dir, 'licences.jsonl')}; {stats['choice_items']} multiple-choice items -> "
          f"{os.path.join(args.out_dir, 'tasks', 'licence_mc.yaml')}")
    if stats["examples"] < 100:
        print(f"error: only {stats['examples']} examples: too few machine-readable copyright files "
              f"under {DOC_ROOT} (a Debian or Ubuntu machine has hundreds)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
