"""security: AccessKey policies; a source is identified by its agent's instance id, not its machine id

Revision ID: 0003_security
Revises: 0002_keys_version
Create Date: 2026-12-01 09:45:00

Until now (account_id, machine_id) was unique, so two agents on one host (two
state dirs) or two cloned VMs (one /etc/machine-id) were one source, and any
usable activation code plus a victim's machine id took that source over.
Rows keep their machine id; their identity becomes "machine:<machine_id>",
which is what an agent that sends no instance id is identified by.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_security"
down_revision = "0002_keys_version"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("access_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("policy", sa.String(length=16), nullable=False, server_default="FullAccess"))
    with op.batch_alter_table("sources", schema=None) as batch_op:
        batch_op.add_column(sa.Column("instance_id", sa.String(length=160), nullable=False, server_default=""))
    op.execute("UPDATE sources SET instance_id = 'machine:' || machine_id")
    with op.batch_alter_table("sources", schema=None) as batch_op:
        batch_op.drop_constraint("uq_sources_account_machine", type_="unique")
        batch_op.create_unique_constraint("uq_sources_account_instance", ["account_id", "instance_id"])


def downgrade() -> None:
    with op.batch_alter_table("sources", schema=None) as batch_op:
        batch_op.drop_constraint("uq_sources_account_instance", type_="unique")
        batch_op.create_unique_constraint("uq_sources_account_machine", ["account_id", "machine_id"])
        batch_op.drop_column("instance_id")
    with op.batch_alter_table("access_keys", schema=None) as batch_op:
        batch_op.drop_column("policy")
