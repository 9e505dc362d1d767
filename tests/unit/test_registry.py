"""The run registry: lookups, concurrent writers on SQLite (WAL), a real PostgreSQL, schema
migrations (alembic) and owner-only files.

The PostgreSQL tests start a private server from the machine's PostgreSQL binaries
(``initdb``, ``postgres``; Debian's ``postgresql`` package) and skip where there are none,
unless ``BRANCHOUT_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), which makes that an error.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pgserver
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from branchout.orchestrator.operate import migrations, registry
from branchout.orchestrator.operate.migrations import RegistrySchemaError
from branchout.orchestrator.operate.registry import Registry, RegistryError
from branchout.orchestrator.run.state import JobState, RunRecord, RunState

# The registry's schema as `metadata.create_all` made it before migrations, frozen here
# (not taken from the code under test): registries like this exist and must upgrade in place.
PRE_MIGRATION = sa.MetaData()
sa.Table(
    "runs", PRE_MIGRATION,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("pipeline", sa.String(128), nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("user", sa.String(128)),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("started", sa.Float),
    sa.Column("ended", sa.Float),
    sa.Column("updated", sa.Float),
    sa.Column("error", sa.Text),
    sa.Column("spec_hash", sa.String(64)),
    sa.Column("source", sa.Text),
    sa.Column("run_uri", sa.Text, nullable=False),
    sa.Column("address", sa.Text),
    sa.Column("submissions", sa.Text),
    sa.Column("driver_host", sa.String(255)),
    sa.Column("driver_pid", sa.Integer),
)
sa.Table(
    "jobs", PRE_MIGRATION,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("started", sa.Float),
    sa.Column("ended", sa.Float),
    sa.Column("error", sa.Text),
    sa.Column("outputs", sa.Text),
    sa.Column("metrics", sa.Text),
    sa.Column("parent", sa.Text),
)
sa.Table(
    "attempts", PRE_MIGRATION,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("job", sa.String(255), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("started", sa.Float),
    sa.Column("ended", sa.Float),
    sa.Column("error", sa.Text),
)
sa.Table(
    "events", PRE_MIGRATION,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(255), index=True),
    sa.Column("reason", sa.Text),
    sa.Column("data", sa.Text),
)


def _record(run_id: str, tmp: str) -> RunRecord:
    rec = RunRecord(run_id=run_id, pipeline="p", run_uri=os.path.join(tmp, run_id), spec_hash="h")
    return rec


def _writer(url: str, tmp: str, worker: int, n: int) -> None:
    registry = Registry(url)
    rec = _record(f"run-{worker}", tmp)
    rec.attach(registry)
    rec.set_run_state(RunState.RUNNING)
    for i in range(n):
        rec.set_job(f"finetune/d{i}", JobState.QUEUED)
        rec.set_job(f"finetune/d{i}", JobState.RUNNING)
        rec.set_job(f"finetune/d{i}", JobState.SUCCEEDED, outputs={"i": i})
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


# ---- PostgreSQL ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_server():
    """A private PostgreSQL server for this module's tests: its URL without a database."""
    with pgserver.postgres_server() as base:
        yield base


@pytest.fixture
def postgres(postgres_server):
    """An empty database of its own for each test, on the module's server."""
    return pgserver.create_database(postgres_server, f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def dialect(request) -> str:
    """Each dialect the registry supports. PostgreSQL's server starts here, at module scope,
    so that it runs before a test begins: conftest's reaper ends what a test started."""
    if request.param == "postgresql":
        request.getfixturevalue("postgres_server")
    return request.param


@pytest.fixture
def url(dialect, request, tmp_path):
    """A URL of an empty database of ``dialect``."""
    if dialect == "postgresql":
        return request.getfixturevalue("postgres")
    return f"sqlite:///{tmp_path / 'reg.db'}"


def test_postgresql_registry(postgres, tmp_path):
    # a fresh database: the writers' first opens also race to create the schema
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


# ---- schema migrations -----------------------------------------------------------------


def _version(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT version_num FROM alembic_version"))]


def _schema_diff(engine: sa.Engine, tables: sa.MetaData) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), tables)


def _registry_tables() -> sa.MetaData:
    """The tables the registry's migrations make: registry.py's and the scheduler's."""
    from branchout.orchestrator.operate.scheduler import schedules

    tables = sa.MetaData()
    for table in (registry.runs, registry.jobs, registry.attempts, registry.events, schedules):
        table.to_metadata(tables)
    return tables


def test_head_is_the_newest_revision():
    script = ScriptDirectory(os.path.dirname(migrations.__file__))
    assert script.get_heads() == [migrations.HEAD]
    assert script.get_revision(migrations.BASELINE).down_revision is None
    assert set(PRE_MIGRATION.tables) == migrations.BASELINE_TABLES


def test_baseline_revision_is_the_pre_migration_schema(url):
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        command.upgrade(migrations.config(conn), migrations.BASELINE)
        conn.commit()
    assert _schema_diff(engine, PRE_MIGRATION) == []


def test_new_registry_is_built_by_migrations_at_head(url):
    reg = Registry(url)
    assert _version(reg.engine) == [migrations.HEAD]
    assert _schema_diff(reg.engine, _registry_tables()) == []


def test_pre_migration_registry_is_upgraded_in_place(url, tmp_path):
    engine = sa.create_engine(url)
    PRE_MIGRATION.create_all(engine)
    runs, jobs, events = (PRE_MIGRATION.tables[n] for n in ("runs", "jobs", "events"))
    with engine.begin() as conn:
        conn.execute(runs.insert().values(run_id="old-run", pipeline="legacy", state="succeeded",
                                          user="u", created=1.0, run_uri="/runs/old-run",
                                          submissions='["raysubmit_1"]'))
        conn.execute(jobs.insert().values(run_id="old-run", name="pretrain", state="succeeded",
                                          attempts=1, outputs='{"model_uri": "m"}'))
        conn.execute(events.insert().values(time=2.0, kind="fired", subject="old-run", reason="cron"))
    engine.dispose()

    reg = Registry(url)

    assert _version(reg.engine) == [migrations.HEAD]
    old = reg.get_run("old-run")
    assert (old.pipeline, old.state, old.submissions) == ("legacy", "succeeded", ["raysubmit_1"])
    assert [(j["name"], j["outputs"]) for j in reg.jobs_of("old-run")] == [("pretrain", {"model_uri": "m"})]
    assert [e["reason"] for e in reg.events_for("old-run")] == ["cron"]
    reg.sync(_record("new-run", str(tmp_path)))  # and it takes new writes
    assert {r.run_id for r in reg.list_runs()} == {"old-run", "new-run"}
    assert _schema_diff(reg.engine, _registry_tables()) == []


def test_registry_of_a_newer_branchout_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    with Registry(url).engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(RegistrySchemaError, match="revision '9999'.*upgrade branchout"):
        Registry(url)


def test_registry_with_some_of_the_tables_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    with sa.create_engine(url).begin() as conn:
        PRE_MIGRATION.tables["runs"].create(conn)
    with pytest.raises(RegistrySchemaError, match="not attempts, events, jobs"):
        Registry(url)


def test_an_up_to_date_registry_opens_without_alembic(tmp_path):
    """Every CLI call opens the registry: at head that must not import alembic (~0.3 s)."""
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    Registry(url)
    script = ("import sys; from branchout.orchestrator.operate.registry import Registry; "
              f"Registry({url!r}); print(sorted(m for m in sys.modules if m.startswith('alembic')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _open_when_told(url: str, conn) -> None:
    conn.send("ready")
    conn.recv()
    Registry(url)


def test_first_opens_at_once_create_the_schema_once(tmp_path):
    # four processes open a new registry at once: one creates the schema and switches the file
    # to WAL, the others wait for it (switching used to fail at once with "database is locked")
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(4)]
    procs = [ctx.Process(target=_open_when_told, args=(url, child)) for _, child in pipes]
    for p in procs:
        p.start()
    for parent, _ in pipes:  # all imported and waiting: then open together
        assert parent.poll(60) and parent.recv() == "ready"
    for parent, _ in pipes:
        parent.send("go")
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert _version(sa.create_engine(url)) == [migrations.HEAD]


# ---- owner-only files ------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o277], ids=["umask022", "umask277"])
def umask(request):
    """The usual umask, and one that clears owner bits: modes come out exact under both."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("where", ["default", "BRANCHOUT_REGISTRY"])
def test_new_registry_is_owner_only(where, umask, tmp_path, monkeypatch):
    if where == "default":
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.delenv("BRANCHOUT_REGISTRY", raising=False)
        db = tmp_path / "home" / ".branchout" / "registry.db"
    else:
        db = tmp_path / "team" / "registries" / "reg.db"
        monkeypatch.setenv("BRANCHOUT_REGISTRY", f"sqlite:///{db}")

    reg = Registry()
    reg.sync(_record("run-1", str(tmp_path)))  # WAL: -wal and -shm exist while it is open

    assert _mode(db.parent) == 0o700
    assert {p.name: _mode(p) for p in db.parent.iterdir()} == {
        db.name: 0o600, f"{db.name}-wal": 0o600, f"{db.name}-shm": 0o600}


@pytest.mark.parametrize("where", ["default", "BRANCHOUT_REGISTRY"])
def test_existing_world_readable_registry_is_tightened(where, tmp_path, monkeypatch):
    if where == "default":
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.delenv("BRANCHOUT_REGISTRY", raising=False)
        db = tmp_path / "home" / ".branchout" / "registry.db"
    else:
        db = tmp_path / "shared" / "reg.db"
        monkeypatch.setenv("BRANCHOUT_REGISTRY", f"sqlite:///{db}")
    db.parent.mkdir(parents=True, mode=0o755)
    db.parent.chmod(0o755)
    PRE_MIGRATION.create_all(sa.create_engine(f"sqlite:///{db}"))
    old = sqlite3.connect(db)  # a driver of an older branchout, still running
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("INSERT INTO runs (run_id, pipeline, state, created, run_uri) "
                "VALUES ('old-run', 'p', 'running', 1.0, '/runs/old-run')")
    old.commit()
    for path in db.parent.iterdir():
        path.chmod(0o644)

    assert Registry().get_run("old-run").state == "running"

    files = {p.name: _mode(p) for p in db.parent.iterdir()}
    assert set(files) == {db.name, f"{db.name}-wal", f"{db.name}-shm"}
    assert set(files.values()) == {0o600}
    # ~/.branchout is branchout's own; a directory the user named may be shared: theirs to set
    assert _mode(db.parent) == (0o700 if where == "default" else 0o755)
    old.close()


def test_a_schedules_table_from_before_migrations_gains_its_missing_columns(tmp_path):
    """It was made by create_all when a ScheduleStore first opened a registry; one made before
    the `watch` column kept lacking it (issue 32). Migration 0002 adds what is missing."""
    from branchout.orchestrator.operate.scheduler import ScheduleStore

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    PRE_MIGRATION.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE schedules (id INTEGER PRIMARY KEY, pipeline TEXT NOT NULL, "
                             "overrides TEXT NOT NULL, cron VARCHAR(128), timezone VARCHAR(64) NOT NULL, "
                             "on_data_change BOOLEAN NOT NULL, poll_s FLOAT NOT NULL, address TEXT, "
                             "overlap VARCHAR(16) NOT NULL, missed VARCHAR(16) NOT NULL, created FLOAT NOT NULL, "
                             "next_fire FLOAT, last_fire FLOAT, last_run VARCHAR(64), last_poll FLOAT, "
                             "fingerprints TEXT, queued BOOLEAN NOT NULL)"))
    store = ScheduleStore(Registry(url))
    schedule_id = store.add(str(tmp_path / "p.yaml"), "0 3 * * *", watch=["legal"], now=0.0)
    assert store.get(schedule_id).watch == ["legal"]
