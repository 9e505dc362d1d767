"""The scheduler: cron instants across DST, overlap, data changes, restarts — on a controllable
clock with a recording launcher; and once as the real `branchout scheduler` process."""

from __future__ import annotations

import signal
import subprocess
import time
from datetime import datetime, timezone

import pytest

from branchout.orchestrator.operate.registry import Registry

from conftest import run_cli


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


@pytest.fixture
def registry(tmp_path):
    return Registry(f"sqlite:///{tmp_path / 'registry.db'}")


@pytest.mark.slow
def test_real_scheduler_process(write_pipeline, tmp_path):
    path = write_pipeline()
    added = run_cli("schedule", "add", str(path), "--cron", "* * * * * *")  # every second
    assert added.returncode == 0, added.stderr
    schedule_id = int(added.stdout.split()[1].rstrip(":"))
    proc = subprocess.Popen(["branchout", "scheduler", "--interval", "0.5"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # Wait on what the scheduler records, not on a fixed sleep: on a loaded 2-core CI machine its
    # start alone (imports, registry) can take most of any fixed window.
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        kinds = [e["kind"] for e in Registry().events_for(f"schedule:{schedule_id}")]
        if "fired" in kinds and kinds.count("skipped") >= 2:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "scheduler stopped (SIGTERM)" in output
    events = Registry().events_for(f"schedule:{schedule_id}")
    kinds = [e["kind"] for e in events]
    assert kinds.count("fired") == 1, output  # one run at a time: every later second is skipped
    assert kinds.count("skipped") >= 2 and all("still running" in e["reason"] for e in events if e["kind"] == "skipped")
    run_id = next(e for e in events if e["kind"] == "fired")["reason"].rsplit(" ", 1)[1]
    deadline = time.time() + 120  # the fired run registers itself, then we stop it
    while time.time() < deadline:
        status = run_cli("status", run_id)
        if status.returncode == 0 and "state running" in status.stdout:
            break
        time.sleep(1)
    stopped = run_cli("stop", run_id)
    assert stopped.returncode == 0, stopped.stderr
    listed = run_cli("schedule", "list")
    assert run_id in listed.stdout
