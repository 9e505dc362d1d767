"""Every benchmarks/RESULTS.md section says what it ran on and, per target, met, missed or
not measured (issue 33): the scripts that write a section are checked here from their source
(importing them would import torch, Ray and DeepSpeed), and the shared table is unit-tested.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

def _results():
    """benchmarks/results.py under a name of its own (it imports nothing heavy at import)."""
    spec = importlib.util.spec_from_file_location("benchmark_results_under_test", BENCHMARKS / "results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


results = _results()


def _called(path: Path) -> set[str]:
    """Names of the functions a script calls (``f(...)`` or ``module.f(...)``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                names.add(node.func.id)
            elif isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
    return names


WRITERS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "results.py" and "write_section" in _called(p))


def test_the_section_writers_are_found():
    assert {p.name for p in WRITERS} >= {"run.py", "data_scale.py", "zero3_memory.py", "contamination.py",
                                         "cache.py", "checkpoint_io.py", "autoscale_lead.py", "farm.py",
                                         "farm_pipeline.py", "probes.py", "replay.py", "quickstart.py", "gpu.py"}


@pytest.mark.parametrize("path", WRITERS, ids=lambda p: p.name)
def test_every_section_writer_stamps_its_section(path):
    assert "stamp" in _called(path), f"{path.name} writes a section without stamp()"


@pytest.mark.parametrize("path", WRITERS, ids=lambda p: p.name)
def test_every_section_writer_ends_with_a_targets_table(path):
    assert "targets_table" in _called(path), f"{path.name} writes a section without targets_table()"


def _cells(line: str) -> list[str]:
    """A markdown row's cells, escaped pipes kept inside their cell."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_targets_table_rows_say_met_missed_or_not_measured():
    Target = results.Target
    lines = results.targets_table([
        Target("warm dispatch → first step", "≤ 0.5 s", "0.088 s", results.status(True), why="unused when met"),
        Target("makespan vs ideal", "≤ 1.1×", "1.44×", results.status(False), why="see note 4"),
        Target("1000 MB: tokens/s ratio", "≥ 0.9", None, results.status(None), why="--sizes 100 did not include it"),
    ])
    assert lines[:2] == ["| target | measured | status |", "|---|---|---|"]
    met, missed, unmeasured = (_cells(line) for line in lines[2:])
    assert met == ["warm dispatch → first step: ≤ 0.5 s", "0.088 s", "**met**"]
    assert missed == ["makespan vs ideal: ≤ 1.1×", "1.44×", "**missed**: see note 4"]
    assert unmeasured[1] == "-" and unmeasured[2] == "**not measured**: --sizes 100 did not include it"
    assert not re.search(r"\d", unmeasured[1] + unmeasured[2].replace("100", "")), "a number the run did not measure"


def test_a_target_not_measured_carries_no_number():
    with pytest.raises(ValueError, match="not measured"):
        results.Target("ratio", "≥ 0.9", "0.93", "not measured", why="not run")
    with pytest.raises(ValueError, match="nothing measured"):
        results.Target("ratio", "≥ 0.9", None, "met")


def test_statuses_are_met_missed_or_not_measured():
    assert results.STATUSES == ("met", "missed", "not measured")
    assert {results.status(ok) for ok in (True, False, None)} == set(results.STATUSES)
    for bad in ("reported", "report", "partly met", ""):
        with pytest.raises(ValueError, match="not one of"):
            results.Target("MFU", "-", "60%", bad, why="x")


def test_a_missed_or_unmeasured_target_carries_its_why():
    for state, measured in (("missed", "1.44×"), ("not measured", None)):
        with pytest.raises(ValueError, match="needs its why"):
            results.Target("makespan", "≤ 1.1×", measured, state)
        with pytest.raises(ValueError, match="needs its why"):
            results.Target("makespan", "≤ 1.1×", measured, state, why="  ")


def test_a_pipe_in_a_cell_does_not_add_a_column():
    (row,) = results.targets_table([results.Target("a | b", "≤ 1", "2", "missed", why="x | y\nz")])[2:]
    assert _cells(row) == [r"a \| b: ≤ 1", "2", r"**missed**: x \| y z"]


REPO = BENCHMARKS.parent

# Sections written before write_section sealed what it wrote (issue 33). Each leaves this set
# when its script runs again; a test fails if a sealed section is still listed, so it only shrinks.
WRITTEN_BEFORE_SEALS = {
    "Contamination",
    "ZeRO-3 vs ZeRO-2 per-rank peak memory (2 CPU ranks, gloo)", "Data stage at scale",
    "Adapter farms in pipeline runs (benchmarks/farm_pipeline.py)",
    "Licence assistant answers (benchmarks/licence.py)",
    "Autoscaling lead (benchmarks/autoscale_lead.py)", "Checkpoint I/O (benchmarks/checkpoint_io.py)",
    "Stage cache (benchmarks/cache.py)",
}


def test_every_section_is_sealed_by_its_script_and_unchanged_since():
    found = results.sections()
    assert found, "benchmarks/RESULTS.md has no section"
    for title, body in found.items():
        lines, seal = results.unsealed(body)
        if seal is None:
            assert title in WRITTEN_BEFORE_SEALS, f"{title}: no seal; sections are written by their script only"
            continue
        assert title not in WRITTEN_BEFORE_SEALS, f"{title} is sealed now: take it out of WRITTEN_BEFORE_SEALS"
        assert (REPO / seal["script"]).is_file(), f"{title}: sealed by {seal['script']}, which does not exist"
        assert seal["digest"] == results.seal_digest(title, lines), \
            f"{title}: changed after {seal['script']} wrote it (run the script again instead of editing)"


def test_a_hand_edit_breaks_the_seal(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(results, "_writer", lambda: "benchmarks/run.py")
    results.write_section("Speed", ["measured 0.94×", "", "| target | measured | status |"])
    body = results.sections()["Speed"]
    lines, seal = results.unsealed(body)
    assert seal["script"] == "benchmarks/run.py" and seal["digest"] == results.seal_digest("Speed", lines)
    edited = [line.replace("0.94", "0.97") for line in lines]
    assert results.seal_digest("Speed", edited) != seal["digest"]
    assert results.unsealed(lines)[1] is None  # a section without its last line has no seal


def test_every_stamp_names_a_commit_of_this_repository():
    import subprocess

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)

    if git("rev-parse", "--is-shallow-repository").stdout.strip() != "false":
        pytest.skip("a shallow clone lacks the older commits the stamps name")
    for title, body in results.sections().items():
        commits = re.findall(r"commit `?([0-9a-f]{7,40})\b", "\n".join(body))
        assert commits, f"{title}: no stamp naming the commit it measured"
        for commit in commits:
            assert git("cat-file", "-e", f"{commit}^{{commit}}").returncode == 0, f"{title}: commit {commit} does not exist"
