"""The run registry: every run, its jobs and their attempts, in one SQL database.

Embedded default: SQLite at ``~/.branchout/registry.db`` (WAL journal, so readers never
block the writer, and a busy timeout, so concurrent drivers queue instead of failing).
A team points ``BRANCHOUT_REGISTRY`` at a PostgreSQL URL instead; the code is
SQLAlchemy Core and dialect-neutral.

The registry is an index and a cache. The authority on a run's progress is its
``state.json`` in run storage, written by the run's driver; the registry receives the
same record in one transaction per change. A client that submitted a run to a remote
cluster (whose driver may write to another registry) refreshes its rows from
``state.json`` when asked for status (``refresh``).

Tables: ``runs`` (one row a run), ``jobs`` (one row a run's job: tokenizer, pretrain,
finetune/<domain>, ...), ``attempts`` (one row per attempt of a job, with its cause of
failure), ``events`` (decisions with reasons, e.g. the scheduler's).

Schema: the tables below are what the code reads and writes; ``migrations/`` (alembic)
is what builds them. Opening a registry brings its schema to the newest revision (a
registry from before migrations is recognised and stamped, never rebuilt); one already
there costs two small queries. A change to a table here needs a new revision there.

Privacy: the registry holds pipeline paths, users, hosts and error text, so a SQLite
registry is its owner's alone: its directory is created 0700, its file 0600 before
SQLite first opens it (SQLite gives the ``-wal``/``-shm`` files the database file's
mode). Files of an older, world-readable registry owned by this user are tightened on
open; so is the default directory ``~/.branchout``, which is branchout's own. A
directory named in ``BRANCHOUT_REGISTRY`` that already exists is left as it is: it may
be shared, and it is its owner's to set.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import stat
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from branchout.orchestrator.operate import migrations
from branchout.orchestrator.run.state import RunRecord

metadata = sa.MetaData()

runs = sa.Table(
    "runs", metadata,
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
    sa.Column("source", sa.Text),  # the pipeline file the run was started from
    sa.Column("run_uri", sa.Text, nullable=False),
    sa.Column("address", sa.Text),  # Ray Jobs API address of a submitted run; null = local
    sa.Column("submissions", sa.Text),  # JSON list of Ray job submission ids
    sa.Column("driver_host", sa.String(255)),
    sa.Column("driver_pid", sa.Integer),
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("started", sa.Float),
    sa.Column("ended", sa.Float),
    sa.Column("error", sa.Text),
    sa.Column("outputs", sa.Text),  # JSON: model_uri, final_loss, ...
    sa.Column("metrics", sa.Text),
    sa.Column("parent", sa.Text),  # lineage: the checkpoint a fine-tune started from
)

attempts = sa.Table(
    "attempts", metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("job", sa.String(255), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("started", sa.Float),
    sa.Column("ended", sa.Float),
    sa.Column("error", sa.Text),
)

events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(255), index=True),
    sa.Column("reason", sa.Text),
    sa.Column("data", sa.Text),
)


class RegistryError(LookupError):
    """A run id or prefix matches no run, or more than one."""


class RegistryConfigError(RuntimeError):
    """The registry's settings cannot be used (an unreadable password file)."""


@dataclass
class RunRow:
    run_id: str
    pipeline: str
    state: str
    user: str | None
    created: float
    started: float | None
    ended: float | None
    error: str | None
    spec_hash: str | None
    source: str | None
    run_uri: str
    address: str | None
    submissions: list[str]
    driver_host: str | None
    driver_pid: int | None

    @property
    def submitted(self) -> bool:
        return self.address is not None


def registry_url() -> str:
    return os.environ.get("BRANCHOUT_REGISTRY") or "sqlite:///" + _default_path()


class Registry:
    def __init__(self, url: str | None = None):
        """Open the registry at ``url`` (default: ``registry_url()``), creating it or
        upgrading its schema as needed.

        Raises:
            RegistrySchemaError: (from ``migrations``) the schema is newer than this
                branchout, or not a registry's.
            OSError: a SQLite registry's directory or file cannot be created.
        """
        self.url = url or registry_url()
        self.engine = _engine(self.url)
        migrations.upgrade(self.engine)

    # ---- writes (drivers, submit) -------------------------------------------------

    def sync(self, record: RunRecord, **extra: Any) -> None:
        """Write the run and every job and attempt of ``record`` in one transaction."""
        now = time.time()
        run_values = {
            "pipeline": record.pipeline, "state": record.state.value, "created": record.created,
            "started": record.started, "ended": record.ended, "updated": now, "error": record.error,
            "spec_hash": record.spec_hash, "run_uri": record.run_uri, **extra,
        }
        with self.engine.begin() as conn:
            if conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id == record.run_id)).first():
                conn.execute(runs.update().where(runs.c.run_id == record.run_id).values(**run_values))
            else:
                conn.execute(runs.insert().values(run_id=record.run_id, user=_user(), **run_values))
            conn.execute(jobs.delete().where(jobs.c.run_id == record.run_id))
            conn.execute(attempts.delete().where(attempts.c.run_id == record.run_id))
            job_rows = [{
                "run_id": record.run_id, "name": s.name, "state": s.state.value, "attempts": s.attempts,
                "started": s.started, "ended": s.ended, "error": s.error,
                "outputs": json.dumps(s.outputs), "metrics": json.dumps(s.metrics),
                "parent": s.outputs.get("parent"),
            } for s in record.jobs.values()]
            if job_rows:
                conn.execute(jobs.insert(), job_rows)
            attempt_rows = [{"run_id": record.run_id, "job": s.name, **a}
                            for s in record.jobs.values() for a in s.history]
            if attempt_rows:
                conn.execute(attempts.insert(), attempt_rows)

    def register_submission(self, record: RunRecord, address: str, submission_id: str, source: str | None) -> None:
        """Record that ``record``'s run was submitted as a Ray job; never overwrites what its
        driver (which may share this registry and start first) has written since."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(runs.c.submissions).where(runs.c.run_id == record.run_id)).first()
            if row is None:
                conn.execute(runs.insert().values(
                    run_id=record.run_id, pipeline=record.pipeline, state=record.state.value, user=_user(),
                    created=record.created, updated=time.time(), spec_hash=record.spec_hash,
                    run_uri=record.run_uri, source=source, address=address,
                    submissions=json.dumps([submission_id])))
            else:
                previous = json.loads(row[0] or "[]")
                conn.execute(runs.update().where(runs.c.run_id == record.run_id).values(
                    address=address, submissions=json.dumps([*previous, submission_id])))

    def update_run(self, run_id: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.run_id == run_id).values(updated=time.time(), **values))

    def log_event(self, kind: str, subject: str, reason: str, **data: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(events.insert().values(time=time.time(), kind=kind, subject=subject,
                                                reason=reason, data=json.dumps(data)))

    # ---- reads ----------------------------------------------------------------------

    def get_run(self, run_id_or_prefix: str) -> RunRow:
        """Find a run by id or unique prefix.

        Raises:
            RegistryError: no run, or several, match.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(runs).where(runs.c.run_id.startswith(run_id_or_prefix, autoescape=True))
                                .order_by(runs.c.created.desc()).limit(6)).mappings().all()
        exact = [r for r in rows if r["run_id"] == run_id_or_prefix]
        if exact:
            rows = exact
        if not rows:
            raise RegistryError(f"no run matches {run_id_or_prefix!r} (see `branchout list`)")
        if len(rows) > 1:
            shown = ", ".join(r["run_id"] for r in rows[:5])
            raise RegistryError(f"{run_id_or_prefix!r} matches several runs ({shown}); give more of the id")
        return _run_row(rows[0])

    def list_runs(self, pipeline: str | None = None, states: list[str] | None = None,
                  limit: int = 50) -> list[RunRow]:
        query = sa.select(runs).order_by(runs.c.created.desc()).limit(limit)
        if pipeline:
            query = query.where(runs.c.pipeline == pipeline)
        if states:
            query = query.where(runs.c.state.in_(states))
        with self.engine.connect() as conn:
            return [_run_row(r) for r in conn.execute(query).mappings().all()]

    def jobs_of(self, run_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs).where(jobs.c.run_id == run_id)).mappings().all()
        return [{**r, "outputs": json.loads(r["outputs"] or "{}"), "metrics": json.loads(r["metrics"] or "{}")}
                for r in rows]

    def attempts_of(self, run_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(
                sa.select(attempts).where(attempts.c.run_id == run_id)
                .order_by(attempts.c.job, attempts.c.attempt)).mappings().all()]

    def events_for(self, subject: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = sa.select(events).order_by(events.c.id.desc()).limit(limit)
        if subject:
            query = query.where(events.c.subject == subject)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings().all()]


def driver_identity() -> dict[str, Any]:
    return {"driver_host": socket.gethostname(), "driver_pid": os.getpid()}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _run_row(r) -> RunRow:
    values = dict(r)
    values.pop("updated", None)
    values["submissions"] = json.loads(values.get("submissions") or "[]")
    return RunRow(**values)


def _default_path() -> str:
    # read at each call, not at import: HOME may change in between (tests, services)
    return os.path.join(os.path.expanduser("~"), ".branchout", "registry.db")


PASSWORD_FILE = "BRANCHOUT_REGISTRY_PASSWORD_FILE"  # noqa: S105 (the variable's name, not a password)


def _engine(url: str) -> sa.Engine:
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        secret_file = os.environ.get(PASSWORD_FILE)
        if secret_file and parsed.password is None:
            # a mounted secret (deploy/): the URL that travels and is printed never holds it
            try:
                with open(secret_file, encoding="utf-8") as f:
                    parsed = parsed.set(password=f.read().strip())
            except OSError as e:
                raise RegistryConfigError(f"{PASSWORD_FILE}: cannot read {secret_file} ({e.strerror})") from None
        return sa.create_engine(parsed, pool_pre_ping=True)
    path = parsed.database
    if path and path != ":memory:" and "uri" not in parsed.query:
        _private_sqlite_file(os.path.abspath(path))
    engine = sa.create_engine(url, connect_args={"timeout": 30})
    sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _private_sqlite_file(path: str) -> None:
    """Make ``path`` (a SQLite database) and its directory owner-only before SQLite opens it:
    create them 0600 and 0700, or tighten this user's existing ones (see the module doc).

    Raises:
        OSError: the directory or the file cannot be created.
    """
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700)
        os.chmod(directory, 0o700)  # the umask may have cleared owner bits of 0o700
    except FileExistsError:
        if directory == os.path.dirname(os.path.abspath(_default_path())):
            _tighten(directory)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        os.fchmod(fd, 0o600)  # as above; an empty file is a valid new SQLite database
        os.close(fd)
    for suffix in ("", "-wal", "-shm", "-journal"):
        _tighten(path + suffix)


def _tighten(path: str) -> None:
    """Take group and other permissions off ``path`` if this user owns it (a missing path is
    fine: SQLite creates its side files later, with the database file's mode)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    import sqlite3

    cur = dbapi_conn.cursor()
    # first: every later statement waits up to 30 s for another process's lock instead of failing
    cur.execute("PRAGMA busy_timeout=30000")
    # WAL belongs to the database file and is set once, by whichever process gets there first.
    # Switching needs the file to itself, and SQLite answers "locked" at once there instead of
    # waiting (three CLIs opening a new registry together lost that race), so wait here.
    deadline = time.monotonic() + 30
    while cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            cur.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
