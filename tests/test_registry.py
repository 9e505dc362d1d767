"""The run registry: lookups, concurrent writers on SQLite (WAL), and a real PostgreSQL."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from raycluster import free_port

from branchout.orchestrator.registry import Registry, RegistryError
from branchout.orchestrator.state import RunRecord, RunState, StageState

pytestmark = pytest.mark.unit


def _record(run_id: str, tmp: str) -> RunRecord:
    rec = RunRecord(run_id=run_id, pipeline="p", run_uri=os.path.join(tmp, run_id), spec_hash="h")
    return rec


def _writer(url: str, tmp: str, worker: int, n: int) -> None:
    registry = Registry(url)
    rec = _record(f"run-{worker}", tmp)
    rec.attach(registry)
    rec.set_run_state(RunState.RUNNING)
    for i in range(n):
        rec.set_stage(f"finetune/d{i}", StageState.QUEUED)
        rec.set_stage(f"finetune/d{i}", StageState.RUNNING)
        rec.set_stage(f"finetune/d{i}", StageState.SUCCEEDED, outputs={"i": i})
    rec.set_run_state(RunState.SUCCEEDED)


def test_concurrent_drivers_do_not_corrupt_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    Registry(url)  # create the schema once, as the first driver would
    procs = [mp.get_context("spawn").Process(target=_writer, args=(url, str(tmp_path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    registry = Registry(url)
    rows = registry.list_runs()
    assert sorted(r.run_id for r in rows) == [f"run-{w}" for w in range(4)]
    for row in rows:
        assert row.state == "succeeded"
        jobs = registry.jobs_of(row.run_id)
        assert len(jobs) == 15 and all(j["state"] == "succeeded" for j in jobs)
        assert len(registry.attempts_of(row.run_id)) == 15
    with registry.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


def test_lookup_by_prefix(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    for run_id in ("20261125-010101-aaaaaa", "20261125-010101-aabbbb", "20261126-000000-cccccc"):
        registry.sync(_record(run_id, str(tmp_path)))
    assert registry.get_run("20261126").run_id == "20261126-000000-cccccc"
    assert registry.get_run("20261125-010101-aaaaaa").run_id == "20261125-010101-aaaaaa"
    with pytest.raises(RegistryError, match="matches several runs"):
        registry.get_run("20261125-010101-aa")
    with pytest.raises(RegistryError, match="no run matches '1999'"):
        registry.get_run("1999")
    with pytest.raises(RegistryError):
        registry.get_run("%")  # LIKE wildcards are escaped, not expanded


@pytest.fixture
def postgres(tmp_path):
    initdb = shutil.which("initdb") or "/usr/lib/postgresql/15/bin/initdb"
    if not os.path.exists(initdb):
        pytest.skip("no PostgreSQL server binaries on this machine")
    # outside pytest's tmp tree: that is private to this user, and the server runs as another
    root = Path(tempfile.mkdtemp(prefix="branchout-pg-"))
    data = root / "pg"
    data.mkdir()
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "branchout"], check=True,
                   capture_output=True)
    port = free_port()
    server = subprocess.Popen([*as_user, os.path.join(os.path.dirname(initdb), "postgres"), "-D", str(data),
                               "-p", str(port), "-h", "127.0.0.1", "-k", str(data)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"postgresql+psycopg2://branchout@127.0.0.1:{port}/postgres"
    deadline = time.time() + 30
    while True:
        try:
            Registry(url)
            break
        except Exception:
            if time.time() > deadline:
                server.terminate()
                raise
            time.sleep(0.3)
    yield url
    server.terminate()
    server.wait(30)
    shutil.rmtree(root, ignore_errors=True)


def test_postgresql_registry(postgres, tmp_path):
    procs = [mp.get_context("spawn").Process(target=_writer, args=(postgres, str(tmp_path), w, 5)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    registry = Registry(postgres)
    assert sorted(r.run_id for r in registry.list_runs(states=["succeeded"])) == ["run-0", "run-1", "run-2"]
    assert len(registry.jobs_of("run-1")) == 5
    assert registry.get_run("run-2").pipeline == "p"
