"""Revision 2: the scheduler's ``schedules`` table under migrations.

It was made by ``metadata.create_all`` when a ``ScheduleStore`` first opened a registry, so
a registry whose table predates a column (``watch``) kept the old table and failed on the
new column. This revision creates the table where there is none, and adds any column an
older one lacks. A copy of the table as it is now, written out (see 0001).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _columns() -> list[sa.Column]:
    return [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("pipeline", sa.Text, nullable=False),
        sa.Column("overrides", sa.Text, nullable=False, server_default="[]"),
        sa.Column("cron", sa.String(128)),
        sa.Column("timezone", sa.String(64), nullable=False, server_default="UTC"),
        sa.Column("on_data_change", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("watch", sa.Text),
        sa.Column("poll_s", sa.Float, nullable=False, server_default="300"),
        sa.Column("address", sa.Text),
        sa.Column("overlap", sa.String(16), nullable=False, server_default="skip"),
        sa.Column("missed", sa.String(16), nullable=False, server_default="run-once"),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("next_fire", sa.Float),
        sa.Column("last_fire", sa.Float),
        sa.Column("last_run", sa.String(64)),
        sa.Column("last_poll", sa.Float),
        sa.Column("fingerprints", sa.Text),
        sa.Column("queued", sa.Boolean, nullable=False, server_default=sa.false()),
    ]


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "schedules" not in inspector.get_table_names():
        op.create_table("schedules", *_columns())
        return
    have = {c["name"] for c in inspector.get_columns("schedules")}
    for column in _columns():
        if column.name not in have:
            op.add_column("schedules", column)


def downgrade() -> None:
    op.drop_table("schedules")
