"""The Jobs API client's one-line errors, where no cluster is needed to provoke them."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
from branchout.orchestrator.operate.jobs import JobsClient, JobsError
try:
    JobsClient("http://127.0.0.1:9").status("x")
except JobsError as e:
    print(e)
"""


def test_token_mode_without_any_token_says_a_token_is_required(tmp_path):
    # RAY_AUTH_MODE=token but no token in the environment, no token file, an empty home:
    # Ray's client refuses before any request. That is a missing token, not a wrong one.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == (
        "the Ray cluster at http://127.0.0.1:9 requires an authentication token: set RAY_AUTH_TOKEN, "
        "or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in ~/.ray/auth_token"), out.stderr[-2000:]
