"""The repository keeps its promises: CI runs the README's test command, docs match code."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.unit


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
    out = subprocess.run([sys.executable, "-m", "branchout.orchestrator.specdoc"], capture_output=True,
                         text=True, check=True).stdout
    assert (REPO / "docs" / "spec.md").read_text() == out, \
        "regenerate: python -m branchout.orchestrator.specdoc > docs/spec.md"
