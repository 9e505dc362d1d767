"""benchmarks/RESULTS.md is a set of ``## <title>`` sections, each written whole by the
benchmark that measured it, and the only place measured numbers live (README links to it
and copies none: a copy is one more place to go stale).

A benchmark replaces only its own section (``write_section``), so running one does not
erase another's numbers, and each section says when and on what it was measured
(``stamp``) and, per target, whether this run met it (``targets_table``).
"""

from __future__ import annotations

import hashlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TITLE = "# Benchmark results"


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


SEAL = re.compile(r"^<!-- sealed: (?P<script>benchmarks/[\w.]+\.py) sha256 (?P<digest>[0-9a-f]{64}) -->$")


def seal_digest(title: str, body: list[str]) -> str:
    """The SHA-256 of a section as its script wrote it (the seal line itself excluded)."""
    return hashlib.sha256("\n".join([title, *_trim(body)]).encode()).hexdigest()


def unsealed(body: list[str]) -> tuple[list[str], re.Match | None]:
    """A section's lines without its seal, and the seal (None when it has none)."""
    if body and (seal := SEAL.match(body[-1].strip())):
        return _trim(body[:-1]), seal
    return body, None


def _writer() -> str:
    """The benchmark script that called ``write_section``, as ``benchmarks/<name>.py``."""
    here = Path(__file__).resolve()
    for frame in inspect.stack():
        path = Path(frame.filename).resolve()
        if path.parent == here.parent and path != here:
            return f"benchmarks/{path.name}"
    raise RuntimeError("write_section is called by a script in benchmarks/ only")


def write_section(title: str, body: list[str]) -> None:
    """Replace (or append) section ``title`` of RESULTS.md; the others stay. The section ends
    with a seal (an HTML comment, not rendered): the writing script and the SHA-256 of what it
    wrote, so a section edited by hand afterwards no longer matches its seal
    (tests/unit/test_results_sections.py checks every seal)."""
    found = sections()
    body = _trim(body)
    found[title] = [*body, "", f"<!-- sealed: {_writer()} sha256 {seal_digest(title, body)} -->"]
    text = "\n".join([TITLE, *(f"\n## {t}\n\n" + "\n".join(lines) for t, lines in found.items())])
    RESULTS.write_text(text.rstrip() + "\n")


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

    # A lent GPU machine gets a copy of the tree whose .git may be older than the tree: there
    # the caller names the commit it sent.
    commit = os.environ.get("BRANCHOUT_COMMIT") or git("rev-parse", "--short", "HEAD") or "unknown commit"
    # RESULTS.md is what benchmarks write, not what they measure: an earlier benchmark's fresh
    # section does not make the measured tree dirty
    if "BRANCHOUT_COMMIT" not in os.environ and git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                                    ":!benchmarks/RESULTS.md"):
        commit += "+dirty"
    from branchout.core.precision import cpu_hardware

    cpu = cpu_hardware()
    libs = []
    for name in ("torch", "deepspeed", "ray", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            libs.append(f"{name} {version(name)}")

    return (f"commit {commit}; {cpu.name}, {os.cpu_count()} cores, {cpu.why} "
            f"(native bf16: {'yes' if cpu.bf16 else 'no'}); Python {platform.python_version()}, {', '.join(libs)}")


# A target is met or missed by what this run measured, or not measured by it: there is no
# "reported" or "see below", so a reader never has to work out a verdict from the numbers.
STATUSES = ("met", "missed", "not measured")


def status(ok: bool | None) -> str:
    """The status of a comparison the script made (``None``: it could not make it)."""
    return "not measured" if ok is None else "met" if ok else "missed"


@dataclass(frozen=True)
class Target:
    """One target and what this run made of it.

    ``what`` and ``target`` are the words and the threshold ("warm dispatch → first step",
    "≤ 0.5 s"); ``measured`` is this run's number as text; ``why`` says why a target was
    missed or not measured (it is not shown for a met one, so a script may always pass it).
    A target the run did not measure carries no number: a number there would read as one it
    measured.
    """

    what: str
    target: str
    measured: str | None
    status: str
    why: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"{self.what}: status {self.status!r} is not one of {STATUSES}")
        if self.status == "not measured" and self.measured:
            raise ValueError(f"{self.what}: not measured, yet it carries a number ({self.measured})")
        if self.status == "met" and not self.measured:
            raise ValueError(f"{self.what}: met, with nothing measured")
        if self.status != "met" and not self.why.strip():
            raise ValueError(f"{self.what}: {self.status} needs its why")


def targets_table(targets: list[Target]) -> list[str]:
    """``| target | measured | status |`` with one row per target, the why after a status
    that is not met; the lines a section ends with."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| target | measured | status |", "|---|---|---|"]
    for t in targets:
        verdict = f"**{t.status}**" + ("" if t.status == "met" else f": {t.why}")
        lines.append(f"| {cell(f'{t.what}: {t.target}')} | {cell(t.measured or '-')} | {cell(verdict)} |")
    return lines
