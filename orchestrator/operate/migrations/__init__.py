"""Schema migrations of the run registry (alembic), run when a registry is opened.

Every ``Registry()`` (so every CLI call and every driver) calls ``upgrade(engine)``. The
common case, a database already at ``HEAD``, costs two small queries and never imports
alembic (importing it takes ~0.3 s). Only a database that is behind takes the slow path:

1. take the database's write lock, so concurrent first opens queue instead of racing to
   create the same tables (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a transaction-scoped
   advisory lock; other dialects: no lock);
2. look again under the lock (another process may have migrated meanwhile);
3. a registry from before migrations (its tables exist, ``alembic_version`` does not) is
   stamped at ``BASELINE``, whose schema is exactly what it was made with;
4. ``alembic upgrade head``, in the same transaction, committed once at the end
   (PostgreSQL and SQLite both roll DDL back, so a failed upgrade leaves the old schema).

No alembic.ini: ``config(connection)`` builds the configuration in code, pointing at this
folder. ``env.py`` runs the revisions on the connection it is handed.

Writing revision N+1: change the tables in ``registry.py``, then write
``versions/000N_<what>.py`` (``op.add_column`` ...) with ``down_revision`` the previous
one, and set ``HEAD``. Alembic can draft it against a scratch database at head::

    from alembic import command
    from branchout.orchestrator.operate import migrations
    from branchout.orchestrator.operate.registry import Registry

    with Registry("sqlite:///scratch.db").engine.connect() as conn:
        command.revision(migrations.config(conn), "add runs.priority", rev_id="0002",
                         autogenerate=True)

``tests/unit/test_registry.py`` fails while ``HEAD``, the newest revision and the tables in
``registry.py`` disagree.

Glossary: *revision*, one file in ``versions/``; *head*, the newest; *stamp*, record a
revision in ``alembic_version`` without running it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    from alembic.config import Config

HEAD = "0002"  # the newest file in versions/; a test checks that alembic agrees
BASELINE = "0001"  # the schema of registries made before migrations (metadata.create_all)
BASELINE_TABLES = frozenset({"runs", "jobs", "attempts", "events"})

# Any constant will do, as long as every branchout process uses the same one.
_PG_LOCK_KEY = int.from_bytes(b"brnchout", "big") >> 1


class RegistrySchemaError(RuntimeError):
    """The registry's schema is not one this version of branchout can bring to ``HEAD``."""


def upgrade(engine: sa.Engine) -> None:
    """Bring the registry behind ``engine`` to ``HEAD``; cheap when it is there already.

    Raises:
        RegistrySchemaError: the database was written by a newer branchout (a revision
            this one does not know), or holds only some of the pre-migration tables.
    """
    with engine.connect() as conn:
        if current_revision(conn) == HEAD:
            return
    with engine.connect() as conn:
        _lock(conn)
        _migrate(conn)
        conn.commit()


def current_revision(conn: sa.Connection) -> str | None:
    """The revision recorded in ``alembic_version``; None for an unmigrated database."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def config(conn: sa.Connection) -> Config:
    """An alembic configuration for this folder that runs on ``conn`` (no alembic.ini)."""
    from alembic.config import Config

    cfg = Config()
    # ConfigParser interpolates '%': escape it, or a path such as /data/100%/ breaks
    cfg.set_main_option("script_location", os.path.dirname(__file__).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = conn
    return cfg


def _lock(conn: sa.Connection) -> None:
    """Begin the transaction that holds the database's write lock until commit."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        # pysqlite would not BEGIN before DDL; IMMEDIATE takes the write lock now
        # (queued behind others by the busy timeout), not at the first write
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif dialect == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})


def _migrate(conn: sa.Connection) -> None:
    """Stamp a pre-migration registry at ``BASELINE``, then upgrade to head (under the lock).

    Raises:
        RegistrySchemaError: as for ``upgrade``.
    """
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    cfg = config(conn)
    revision = current_revision(conn)
    if revision == HEAD:
        return  # another process migrated while this one waited for the lock
    if revision is None and _is_baseline(conn):
        command.stamp(cfg, BASELINE)
    elif revision is not None:
        try:
            ScriptDirectory.from_config(cfg).get_revision(revision)
        except CommandError:
            raise RegistrySchemaError(
                f"the registry's schema is at revision {revision!r}, which this branchout "
                f"does not know (its newest is {HEAD!r}): a newer branchout wrote it; "
                "upgrade branchout") from None
    command.upgrade(cfg, "head")


def _is_baseline(conn: sa.Connection) -> bool:
    """Whether ``conn`` holds a registry made before migrations (False: an empty database).

    Raises:
        RegistrySchemaError: only some of the baseline tables exist, so neither creating
            them nor stamping them would be right.
    """
    present = BASELINE_TABLES & set(sa.inspect(conn).get_table_names())
    if present and present != BASELINE_TABLES:
        missing = ", ".join(sorted(BASELINE_TABLES - present))
        raise RegistrySchemaError(
            f"the registry has tables {', '.join(sorted(present))} but not {missing}, and no "
            "alembic_version: it was not made by branchout, or its creation was cut short")
    return bool(present)
