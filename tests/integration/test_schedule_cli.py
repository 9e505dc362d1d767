"""The scheduler: cron instants across DST, overlap, data changes, restarts — on a controllable
clock with a recording launcher; and once as the real `branchout scheduler` process."""

from __future__ import annotations

import shlex
from datetime import datetime, timezone

import pytest

from branchout.orchestrator.operate.registry import Registry

from conftest import REPO


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


@pytest.fixture
def registry(tmp_path):
    return Registry(f"sqlite:///{tmp_path / 'registry.db'}")


def test_schedule_add_checks_watched_names(write_pipeline, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from branchout.orchestrator.cli import app

    monkeypatch.setenv("BRANCHOUT_REGISTRY", f"sqlite:///{tmp_path / 'reg.db'}")
    path = write_pipeline()
    bad = CliRunner().invoke(app, ["schedule", "add", str(path), "--watch", "legall"])
    assert bad.exit_code == 2 and "--watch legall: not a dataset of" in bad.output
    # the README's "every Monday, and whenever legal data changes", flags as printed there
    readme = (REPO / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("branchout schedule add examples/quickstart.yaml"))
    args = shlex.split(line.split("#")[0])[4:]  # after "branchout schedule add PIPELINE"
    good = CliRunner().invoke(app, ["schedule", "add", str(path), *args])
    assert good.exit_code == 0 and "data-change=legal" in good.output, good.output
    listed = CliRunner().invoke(app, ["schedule", "list"])
    assert "0 3 * * 1" in listed.output and "Europe/Berlin" in listed.output and "legal, every 600s" in listed.output


def test_a_pipeline_path_that_looks_like_markup_is_listed_as_text(write_pipeline, tmp_path, monkeypatch):
    """Before: `schedule add` of such a path succeeded, and every `schedule list` after it
    crashed with rich's MarkupError."""
    from typer.testing import CliRunner

    from branchout.orchestrator.cli import app

    monkeypatch.setenv("BRANCHOUT_REGISTRY", f"sqlite:///{tmp_path / 'reg.db'}")
    (tmp_path / "[").mkdir()
    path = write_pipeline(name="[/x].yaml")
    assert path.name == "x].yaml" and path.parent.name == "["
    added = CliRunner().invoke(app, ["schedule", "add", str(path), "--cron", "0 3 * * 1"])
    assert added.exit_code == 0, added.output
    assert f"schedule 1: {path} cron=0 3 * * 1" in added.output
    listed = CliRunner().invoke(app, ["schedule", "list"])
    assert listed.exit_code == 0, listed.output
    assert "x].yaml" in listed.output  # the path as text (the table may wrap it)
