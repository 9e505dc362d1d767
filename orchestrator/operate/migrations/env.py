"""Alembic's entry point: runs the revisions in ``versions/`` (see ``__init__.py``).

At runtime ``upgrade`` hands over a connection with its transaction (and the database's
write lock) already begun; alembic then neither begins nor commits, and the caller
commits once. Given only ``sqlalchemy.url`` (a developer's own alembic command) this
opens its own connection, or with ``--sql`` prints the DDL (e.g. for a DBA to review).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context


def _target_metadata() -> sa.MetaData:
    # only autogenerate reads it; imported late so that the revisions never depend on it
    from branchout.orchestrator.operate.registry import metadata

    return metadata


def _run_on(conn: sa.Connection) -> None:
    context.configure(connection=conn, target_metadata=_target_metadata())
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    config = context.config
    conn = config.attributes.get("connection")
    url = config.get_main_option("sqlalchemy.url")
    if conn is not None:
        _run_on(conn)
    elif context.is_offline_mode():
        context.configure(url=url, literal_binds=True, target_metadata=_target_metadata())
        with context.begin_transaction():
            context.run_migrations()
    else:
        with sa.create_engine(url).connect() as own:
            _run_on(own)
            own.commit()


_main()
