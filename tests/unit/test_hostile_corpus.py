"""Hostile pipeline files (tests/hostile/, issue 32): credentials in every URI and free-form
setting, markup, escape codes, bidi and newlines in names, path traversal, devices, YAML that
would run code or never end, numbers that are not numbers. Each one, through every command that
reads a pipeline file, gives exactly its `error:` lines and exit code 2, before anything starts:
no traceback, no planted secret (`# secret:` lines) in any output, nothing written anywhere.

tests/bad_specs/ holds the careless mistakes; this corpus the deliberate ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from branchout.orchestrator.cli import app

from conftest import REPO

HOSTILE = sorted((REPO / "tests" / "hostile").glob("*.yaml"))
# a cluster that cannot be there: submit must refuse the file before it tries to reach one
COMMANDS = [["validate"], ["plan"], ["submit", "--address", "http://127.0.0.1:9"]]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_the_corpus_is_large_enough():
    # with tests/bad_specs/' own hostile ones (alias bomb, deep nesting, credentials), over 40
    assert len(HOSTILE) >= 30


@pytest.mark.parametrize("path", HOSTILE, ids=lambda p: p.stem)
def test_a_hostile_pipeline_file_is_one_clean_refusal_everywhere(path, tmp_path, monkeypatch):
    text = path.read_text()
    expected = [f"error: {path}: {ln.removeprefix('# expect: ')}" for ln in text.splitlines()
                if ln.startswith("# expect: ")]
    secrets = [ln.removeprefix("# secret: ") for ln in text.splitlines() if ln.startswith("# secret: ")]
    assert expected, f"{path.name} names no expected message"
    work, home = tmp_path / "cwd", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("BRANCHOUT_REGISTRY", f"sqlite:///{tmp_path / 'registry.db'}")
    corpus_before = _tree(path.parent)
    reads_data = any(ln.startswith("# data: ") for ln in text.splitlines())
    for command in COMMANDS:
        result = CliRunner().invoke(app, [*command, str(path)])
        shown = result.stdout + result.stderr
        if command == ["plan"] and reads_data:  # a memory plan from the spec alone: the data is not its to see
            assert result.exit_code == 0, shown
        else:
            assert result.exit_code == 2, (command, shown)
            assert [ln for ln in result.stderr.splitlines() if ln.strip()] == expected, command
        assert "Traceback" not in shown, command
        assert result.exception is None or isinstance(result.exception, SystemExit), command
        for secret in secrets:
            assert secret not in shown, (command, secret)
    # nothing written: not here, not in HOME, not beside the file, no registry
    assert _tree(work) == set() and _tree(home) == set()
    assert _tree(path.parent) == corpus_before
    assert not os.path.exists(tmp_path / "registry.db")
