"""Revision 1: the registry as it was before migrations (runs, jobs, attempts, events).

A copy of ``registry.py``'s tables at the time, written out rather than imported: a
revision must keep building the schema it was written for after those tables change.
Registries made before migrations (by ``metadata.create_all``) hold exactly this schema
and are stamped at this revision instead of running it; the names of the indexes are the
ones ``create_all`` gave them (``ix_<table>_<column>``).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("pipeline", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
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
    op.create_index("ix_runs_pipeline", "runs", ["pipeline"])
    op.create_index("ix_runs_state", "runs", ["state"])
    op.create_table(
        "jobs",
        sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), primary_key=True),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("started", sa.Float),
        sa.Column("ended", sa.Float),
        sa.Column("error", sa.Text),
        sa.Column("outputs", sa.Text),
        sa.Column("metrics", sa.Text),
        sa.Column("parent", sa.Text),
    )
    op.create_table(
        "attempts",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("job", sa.String(255), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started", sa.Float),
        sa.Column("ended", sa.Float),
        sa.Column("error", sa.Text),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(255)),
        sa.Column("reason", sa.Text),
        sa.Column("data", sa.Text),
    )
    op.create_index("ix_events_subject", "events", ["subject"])


def downgrade() -> None:
    for table in ("events", "attempts", "jobs", "runs"):
        op.drop_table(table)
