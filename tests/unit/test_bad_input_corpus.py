"""Every malformed pipeline file under tests/bad_specs/ and bad data file under tests/bad_data/
produces exactly the message it names, as one `error:` line each, with exit code 2."""

from __future__ import annotations

import copy

import pytest
import yaml
from typer.testing import CliRunner

from branchout.orchestrator.cli import app

from conftest import REPO, TINY

BAD_SPECS = sorted((REPO / "tests" / "bad_specs").glob("*.yaml"))
BAD_DATA_DIR = REPO / "tests" / "bad_data"
EXPECTED_DATA = yaml.safe_load((BAD_DATA_DIR / "EXPECTED.yaml").read_text())


def test_corpus_sizes():
    assert len(BAD_SPECS) >= 30 and len(EXPECTED_DATA) >= 10


def _errors(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.strip()]


@pytest.mark.parametrize("path", BAD_SPECS, ids=lambda p: p.stem)
def test_malformed_pipeline_file(path):
    expected = [ln.removeprefix("# expect: ") for ln in path.read_text().splitlines() if ln.startswith("# expect: ")]
    assert expected, f"{path.name} names no expected message"
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert _errors(result) == [f"error: {path}: {line}" for line in expected]


@pytest.mark.parametrize("name", sorted(EXPECTED_DATA), ids=str)
def test_bad_data_file(name, write_pipeline):
    expected = EXPECTED_DATA[name]
    # a plain entry is the message for a text dataset; instruction data names its columns too
    keys, message = (expected["dataset"], expected["error"]) if isinstance(expected, dict) else ({}, expected)
    spec = copy.deepcopy(TINY)
    spec["finetune"]["domains"][0]["dataset"] = {"path": str(BAD_DATA_DIR / name), **keys}
    path = write_pipeline(spec)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    message = message.replace("{dir}", str(BAD_DATA_DIR))
    assert _errors(result) == [f"error: {path}: finetune.domains.0.dataset: {message}"]
