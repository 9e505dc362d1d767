"""The linters CI runs: ruff's rules, flake8-bandit's security rules (S) among them, over the
whole repository (pyproject.toml says which and why some are off)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_ruff_finds_nothing():
    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    result = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
