"""benchmarks/RESULTS.md is a set of ``## <title>`` sections, each written whole by the
benchmark that measured it; README's performance tables are generated from them.

A benchmark replaces only its own section (``write_section``), so running one does not
erase another's numbers, and each section says when and on what it was measured. The
README block between ``README_BEGIN`` and ``README_END`` is every section's first table
under its title (``readme_block``); ``write_section`` refreshes it, and a test checks that
README holds exactly that, so no number in README is typed by hand.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
README = Path(__file__).resolve().parent.parent / "README.md"
TITLE = "# Benchmark results"
README_BEGIN = "<!-- generated from benchmarks/RESULTS.md by benchmarks/results.py: do not edit -->"
README_END = "<!-- end of generated benchmark tables -->"


def sections(text: str | None = None) -> dict[str, list[str]]:
    """``{title: body lines}`` of every ``## title`` section, in file order."""
    if text is None:
        text = RESULTS.read_text() if RESULTS.exists() else TITLE
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return {k: _trim(v) for k, v in found.items()}


def write_section(title: str, body: list[str]) -> None:
    """Replace (or append) section ``title`` of RESULTS.md; the others stay; README follows."""
    found = sections()
    found[title] = _trim(body)
    text = "\n".join([TITLE, *(f"\n## {t}\n\n" + "\n".join(lines) for t, lines in found.items())])
    RESULTS.write_text(text.rstrip() + "\n")
    sync_readme()


def first_table(lines: list[str]) -> list[str]:
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|")), None)
    if start is None:
        return []
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def readme_block(text: str | None = None) -> str:
    """Every section's first table under its title, as README shows them."""
    parts = []
    for title, lines in sections(text).items():
        table = first_table(lines)
        if table:
            parts += [f"**{title}**", "", *table, ""]
    return "\n".join(parts).rstrip()


def readme_generated_part(readme: str | None = None) -> str:
    readme = README.read_text() if readme is None else readme
    start, end = readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)
    return readme[start:end].strip()


def sync_readme() -> None:
    readme = README.read_text()
    start, end = readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)
    README.write_text(readme[:start] + "\n" + readme_block() + "\n" + readme[end:])


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def stamp() -> str:
    """What a measurement ran on: the commit (``+dirty`` when the tree had changes), the CPU,
    and the versions of the libraries that set the numbers."""
    import contextlib
    import os
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    repo = RESULTS.parent.parent

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    from branchout.core.precision import cpu_hardware

    cpu = cpu_hardware()
    libs = []
    for name in ("torch", "deepspeed", "ray", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            libs.append(f"{name} {version(name)}")

    return (f"commit {commit}; {cpu.name}, {os.cpu_count()} cores, {cpu.why} "
            f"(native bf16: {'yes' if cpu.bf16 else 'no'}); Python {platform.python_version()}, {', '.join(libs)}")
