"""Build the quickstart's corpora from real text already on this machine.

    python examples/corpus.py examples/data          # ~3 MB of JSONL, a few seconds

No download and no committed copies: every document comes from files any Python
installation has, and a Debian machine adds more.

    general.jsonl  English prose about software: ``pydoc_data`` topics and docstrings of
                   half of the standard library's modules (the pretraining corpus)
    legal.jsonl    licence texts: every installed package's ``*.dist-info`` licence files,
                   ``/usr/share/common-licenses`` and Debian's ``/usr/share/doc/*/copyright``
                   files (machine-readable Files/Copyright/License stanzas) where present
    code.jsonl     Python source of the *other* half of the standard library's modules
    docs.jsonl     package documentation (Markdown/reST) from ``*.dist-info/METADATA``

The stdlib is split by module so the code domain never contains the docstrings the base
model was pre-trained on, and a document is kept only if it is new: not identical to, and
not a near-duplicate of (half of its word 8-grams already kept), any document kept before
it in any corpus. Licence files are mostly copies of a few licences that differ in a
copyright line; without this the legal corpus would be a handful of licences, many times
over, and a held-out split of it would be text the model trained on.
"""

from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import json
import os
import site
import sys
import sysconfig
from collections.abc import Iterable, Iterator

CORPORA = ("general", "legal", "code", "docs")
NEAR_DUPLICATE = 0.5  # share of a document's word 8-grams already kept that makes it a copy
DEFAULT_MAX_BYTES = {"general": 1_600_000, "legal": 700_000, "code": 700_000, "docs": 700_000}


def chunk(text: str, max_chars: int = 3000) -> list[str]:
    """Split at blank lines into pieces of at most ~``max_chars`` (a paragraph is never cut)."""
    pieces, current = [], []
    size = 0
    for para in text.split("\n\n"):
        if current and size + len(para) > max_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        pieces.append("\n\n".join(current))
    return [p.strip() for p in pieces if len(p.strip()) >= 200]


def _stdlib_modules() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    skip = ("/test", "/tests", "site-packages", "idlelib", "lib2to3", "/turtledemo", "/__phello__")
    return sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                  if not any(s in f for s in skip))


def _half(path: str) -> int:
    return hashlib.sha256(os.path.basename(path).encode()).digest()[0] % 2


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return ""


def general_texts() -> Iterator[str]:
    import pydoc_data.topics

    for key in sorted(pydoc_data.topics.topics):
        yield pydoc_data.topics.topics[key]
    for path in _stdlib_modules():
        if _half(path) != 0:
            continue
        try:
            tree = ast.parse(_read(path))
        except (SyntaxError, ValueError):
            continue
        nodes = [tree, *[n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)]]
        docs = [ast.get_docstring(n) for n in nodes]
        yield "\n\n".join(d for d in docs if d and len(d) > 80)


def code_texts() -> Iterator[str]:
    for path in _stdlib_modules():
        if _half(path) == 1:
            yield _read(path)


def _dist_info_dirs() -> list[str]:
    dirs = []
    for sp in {*site.getsitepackages(), site.getusersitepackages(), *sys.path}:
        if isinstance(sp, str) and os.path.isdir(sp):
            dirs += glob.glob(os.path.join(sp, "*.dist-info"))
    return sorted(set(dirs))


def legal_texts() -> Iterator[str]:
    for d in _dist_info_dirs():
        for path in sorted(glob.glob(os.path.join(d, "**", "*"), recursive=True)):
            name = os.path.basename(path).upper()
            if os.path.isfile(path) and ("LICEN" in name or "COPYING" in name or "/licenses/" in path):
                yield _read(path)
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path):
            yield _read(path)
    for path in sorted(glob.glob("/usr/share/doc/*/copyright")):
        yield _read(path)


def docs_texts() -> Iterator[str]:
    for d in _dist_info_dirs():
        text = _read(os.path.join(d, "METADATA"))
        _, sep, body = text.partition("\n\n")  # RFC 822 headers end at the first blank line
        if sep and len(body) > 500:
            yield body


SOURCES = {"general": general_texts, "legal": legal_texts, "code": code_texts, "docs": docs_texts}


def build(out_dir: str, max_bytes: dict[str, int] | None = None,
          sources: dict[str, callable] | None = None) -> dict[str, dict[str, int]]:
    """Write ``<out_dir>/<corpus>.jsonl`` for every corpus; returns documents and bytes each."""
    max_bytes = {**DEFAULT_MAX_BYTES, **(max_bytes or {})}
    sources = sources or SOURCES
    os.makedirs(out_dir, exist_ok=True)
    seen: set[int] = set()
    stats = {}
    for name, texts in sources.items():
        docs = _take(_unique(texts(), seen), max_bytes[name])
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
        stats[name] = {"documents": len(docs), "bytes": sum(len(d.encode()) for d in docs)}
    return stats


def _unique(texts: Iterable[str], seen: set[int]) -> Iterator[str]:
    """Pieces that are neither copies nor near-copies of anything in ``seen`` (word
    8-gram hashes of every piece kept so far, in any corpus)."""
    for text in texts:
        for piece in chunk(text.replace("\r\n", "\n")):
            words = piece.split()
            grams = {hash(tuple(words[i:i + 8])) for i in range(max(1, len(words) - 7))}
            if len(grams & seen) < NEAR_DUPLICATE * len(grams):
                seen.update(grams)
                yield piece


def _take(docs: Iterable[str], limit: int) -> list[str]:
    out, size = [], 0
    for doc in docs:
        if size >= limit:
            break
        out.append(doc)
        size += len(doc.encode())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=os.path.join(os.path.dirname(__file__), "data"))
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply every corpus's size cap.")
    args = parser.parse_args(argv)
    caps = {k: int(v * args.scale) for k, v in DEFAULT_MAX_BYTES.items()}
    stats = build(args.out_dir, caps)
    for name, s in stats.items():
        print(f"{name:8s} {s['documents']:6d} documents {s['bytes'] / 1e6:6.2f} MB -> "
              f"{os.path.join(args.out_dir, name + '.jsonl')}")
    empty = [n for n, s in stats.items() if s["documents"] < 20]
    if empty:
        print(f"error: too little text found for: {', '.join(empty)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
