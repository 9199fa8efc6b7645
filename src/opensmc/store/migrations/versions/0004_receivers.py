"""receivers: receiver processes register under their endpoint; a job records its run's receiver

Revision ID: 0004_receivers
Revises: 0003_security
Create Date: 2026-12-01 12:50:00

Several `--roles receiver` processes on other hosts share one database: each
keeps a row in `receivers` fresh (endpoint, capacity, heartbeat), a started
job is placed on one (`jobs.receiver`), and a job whose receiver stopped
heartbeating is handed over to another.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_receivers"
down_revision = "0003_security"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "receivers",
        sa.Column("endpoint", sa.String(length=255), nullable=False),
        sa.Column("instance", sa.String(length=64), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("endpoint", name=op.f("pk_receivers")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("receiver", sa.String(length=255), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_receiver"), ["receiver"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_receiver"))
        batch_op.drop_column("receiver")
    op.drop_table("receivers")
