"""keys_version (the verified-key cache's invalidation counter) and DescribeReplicationJobs indexes

Revision ID: 0002_keys_version
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_keys_version"
down_revision = "0001"
branch_labels = None
depends_on = None

_JOB_INDEXES: dict[str, list[str | sa.TextClause]] = {
    "ix_jobs_account_created": ["account_id", sa.text("created_at DESC"), "id"],
    "ix_jobs_account_status": ["account_id", "status", "created_at"],
    "ix_jobs_account_business": ["account_id", "business_status", "created_at"],
    "ix_jobs_account_type": ["account_id", "job_type", "created_at"],
    "ix_jobs_account_region": ["account_id", "region_id", "created_at"],
    "ix_jobs_account_rg": ["account_id", "resource_group_id", "created_at"],
    "ix_jobs_account_instance": ["account_id", "instance_id"],
    "ix_jobs_account_source": ["account_id", "source_id"],
}


def upgrade() -> None:
    op.create_table(
        "keys_version",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keys_version")),
    )
    op.execute("INSERT INTO keys_version (id, version) VALUES (1, 0)")
    for name, cols in _JOB_INDEXES.items():
        op.create_index(name, "jobs", cols, unique=False)


def downgrade() -> None:
    for name in _JOB_INDEXES:
        op.drop_index(name, table_name="jobs")
    op.drop_table("keys_version")
