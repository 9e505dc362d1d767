"""Property: whatever a pipeline file says, `branchout validate` answers with a plan or with
clear error lines and exit code 2 — never a traceback, never a hang.

Mutations start from a valid tiny spec: values replaced by other types, extreme numbers,
unicode or huge strings; keys deleted; unknown keys added.
"""

from __future__ import annotations

import copy
import signal

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from branchout.orchestrator.cli import app

from conftest import TINY


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


PATHS = [p for p in _paths(TINY) if p]

VALUES = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x2FFFF), min_size=1, max_size=20),
    st.builds(lambda n: "x" * n, st.integers(min_value=10_000, max_value=200_000)),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=2),
)

MUTATION = st.tuples(st.sampled_from(["replace", "delete", "add"]), st.sampled_from(PATHS), VALUES,
                     st.text(min_size=1, max_size=12))


def _apply(spec: dict, mutation) -> None:
    kind, path, value, new_key = mutation
    parent = spec
    for part in path[:-1]:
        if isinstance(parent, dict) and part in parent or isinstance(parent, list) and isinstance(part, int) and part < len(parent):
            parent = parent[part]
        else:
            return  # an earlier mutation removed this branch
    last = path[-1]
    if isinstance(parent, dict) and last in parent:
        if kind == "delete":
            del parent[last]
        elif kind == "add" and isinstance(parent[last], dict):
            parent[last][new_key] = value
        else:
            parent[last] = value
    elif isinstance(parent, list) and isinstance(last, int) and last < len(parent):
        if kind == "delete":
            parent.pop(last)
        else:
            parent[last] = value


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout("validate did not answer within 60 s")


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_validate_answers_plan_or_clear_error(mutations, write_pipeline):
    spec = copy.deepcopy(TINY)
    for m in mutations:
        _apply(spec, m)
    path = write_pipeline(spec)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        result = CliRunner().invoke(app, ["validate", str(path)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{yaml.safe_dump(spec)[:2000]}")
    assert result.exit_code in (0, 2), result.output
    out = result.stdout + result.stderr
    assert "Traceback" not in out
    if result.exit_code == 0:
        assert "is valid" in result.stdout
    else:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert lines and all(ln.startswith(("error: ", "note: ")) for ln in lines), result.stderr
        assert any(ln.startswith(f"error: {path}: ") for ln in lines)
