"""Build a licence Q&A set from Debian's machine-readable copyright files on this machine.

    python examples/licences.py examples/data        # licences.jsonl, ~1 MB, a second

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


def build(out_dir: str, max_examples: int = DEFAULT_MAX_EXAMPLES, doc_root: str = DOC_ROOT) -> dict[str, int]:
    """Write ``<out_dir>/licences.jsonl``; returns its example and byte counts."""
    rows = examples(doc_root, max_examples)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "licences.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return {"examples": len(rows), "bytes": os.path.getsize(path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=os.path.join(os.path.dirname(__file__), "data"))
    parser.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES)
    args = parser.parse_args(argv)
    stats = build(args.out_dir, args.max_examples)
    print(f"licences {stats['examples']:6d} examples {stats['bytes'] / 1e6:6.2f} MB -> "
          f"{os.path.join(args.out_dir, 'licences.jsonl')}")
    if stats["examples"] < 100:
        print(f"error: only {stats['examples']} examples: too few machine-readable copyright files "
              f"under {DOC_ROOT} (a Debian or Ubuntu machine has hundreds)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
