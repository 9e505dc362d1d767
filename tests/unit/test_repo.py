"""The repository keeps its promises: CI runs the README's test command, docs match code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (REPO / "README.md").read_text())


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    quickstart, tests = _readme_commands()[:2]
    assert "branchout run examples/quickstart.yaml" in quickstart and "torch==2.13.0" in quickstart
    assert tests.endswith("pytest") and "torch==2.13.0" in tests
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci and "set -euo pipefail" in ci
    assert "|| true" not in ci


def test_spec_reference_is_generated_from_the_models():
    out = subprocess.run([sys.executable, "-m", "branchout.orchestrator.config.specdoc"], capture_output=True,
                         text=True, check=True).stdout
    assert (REPO / "docs" / "spec.md").read_text() == out, \
        "regenerate: python -m branchout.orchestrator.config.specdoc > docs/spec.md"


def _test_names() -> dict[str, set[str]]:
    """Every test function by the file that defines it (anywhere under tests/)."""
    import ast

    names: dict[str, set[str]] = {}
    for path in (REPO / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        names.setdefault(path.name, set()).update(
            n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_"))
    return names


def test_every_test_the_docs_cite_exists():
    names = _test_names()
    cited = set()
    for doc in [REPO / "README.md", REPO / "deploy" / "README.md", *(REPO / "docs").glob("*.md")]:
        cited |= {(doc.name, m) for m in re.findall(r"`(?:tests/)?((?:\w+/)*test_\w+\.py(?:::\w+)?)`", doc.read_text())}
    assert len(cited) >= 10  # docs/failure-model.md alone cites a dozen
    missing = []
    for doc, ref in sorted(cited):
        path, _, test = ref.partition("::")
        file = path.rpartition("/")[2]
        moved = "/" in path and not (REPO / "tests" / path).is_file()  # a folder is named: it must be that one
        if moved or file not in names or (test and test not in names[file]):
            missing.append(f"{doc}: {ref}")
    assert not missing, "docs cite tests that do not exist: " + ", ".join(missing)


def test_readme_copies_no_measured_numbers():
    """Numbers live in benchmarks/RESULTS.md, written by the script that measured them."""
    readme = (REPO / "README.md").read_text()
    assert "benchmarks/RESULTS.md" in readme
    prose = re.sub(r"```.*?```", "", readme, flags=re.S)  # sample output (the plan's estimates) aside
    assert not re.search(r"\d[\d,.]* ?(tok/s|GiB|GFLOP/s)", prose), "README quotes a measurement; link RESULTS.md"


def test_state_diagrams_in_the_docs_are_drawn_from_the_transition_tables():
    from branchout.orchestrator.run.state import diagrams_markdown

    text = (REPO / "docs" / "architecture.md").read_text()
    begin, end = "<!-- generated from orchestrator/run/state.py: do not edit -->\n", "<!-- end of generated state diagrams -->"
    assert begin in text and end in text
    assert text.split(begin, 1)[1].split(end, 1)[0] == diagrams_markdown(), \
        "regenerate the block in docs/architecture.md from: python -m branchout.orchestrator.run.state"


def test_every_package_folder_is_in_the_wheel():
    """A folder missing from pyproject's package list works in the editable install that
    tests use and is absent from `pip install .` (the Docker image, KubeRay pods)."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    skip = {"tests", "benchmarks", "examples", "deploy", "docs", "build"}
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    folders = {Path(f).parent for f in tracked} - {Path(".")}  # folders of modules, __init__.py or not
    found = {"branchout"} | {"branchout." + ".".join(d.parts) for d in folders if d.parts[0] not in skip}
    assert found == listed, {"missing from pyproject": sorted(found - listed), "not a folder": sorted(listed - found)}


def test_test_modules_have_unique_names():
    """tests/ has no __init__.py: pytest imports each test file by its basename, and a second
    file of the same name in another tier stops the whole collection."""
    from collections import Counter

    names = Counter(p.name for p in (REPO / "tests").rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
