"""The schema, as SQLAlchemy Core tables: one definition for SQLite and PostgreSQL.

Times are stored as timezone-aware UTC datetimes. JSON documents that the
API echoes verbatim (disk selections, discovered disks, manifests) are kept
as text: they are read and written whole, never queried inside.
Alembic migrations under ``store/migrations`` must produce exactly this
schema (tests/integration/test_migrations.py checks it).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

TS = DateTime(timezone=True)

accounts = Table(
    "accounts",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("created_at", TS, nullable=False),
)

#: AccessKey pairs. The secret is needed to verify HMAC signatures, so it is
#: kept encrypted (Fernet, key outside the database), never in clear.
access_keys = Table(
    "access_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("account_id", String(32), ForeignKey("accounts.id"), nullable=False),
    Column("secret_enc", Text, nullable=False),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_at", TS, nullable=False),
    #: "FullAccess", or "ReadOnly" (Describe*/List* actions only)
    Column("policy", String(16), nullable=False, default="FullAccess", server_default="FullAccess"),
)

#: One row (id 1): bumped whenever an AccessKey is disabled, deleted or changed, so that
#: every process's verified-key cache (service/keycache.py) sees it at the next request.
keys_version = Table(
    "keys_version",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False),
)

#: Signature nonces seen inside the timestamp window (replay protection
#: shared by every API process).
nonces = Table(
    "nonces",
    metadata,
    Column("access_key_id", String(64), primary_key=True),
    Column("nonce", String(128), primary_key=True),
    Column("seen_at", TS, nullable=False, index=True),
)

access_tokens = Table(
    "access_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("account_id", String(32), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("name", String(128), nullable=False, default=""),
    Column("description", Text, nullable=False, default=""),
    Column("code_hash", String(128), nullable=False),
    Column("count", Integer, nullable=False),
    Column("registered_count", Integer, nullable=False, default=0),
    Column("ttl_days", Integer, nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", TS, nullable=False),
)

workgroups = Table(
    "workgroups",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("account_id", String(32), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("name", String(64), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("created_at", TS, nullable=False),
    UniqueConstraint("account_id", "name", name="uq_workgroups_account_name"),
)

sources = Table(
    "sources",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("account_id", String(32), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("state", String(16), nullable=False),
    Column("error_code", String(64), nullable=False, default=""),
    Column("status_info", Text, nullable=False, default=""),
    Column("job_id", String(32), nullable=False, default=""),  #: the source's last job
    Column("workgroup_id", String(32), nullable=False, default="", index=True),
    Column("resource_group_id", String(64), nullable=False, default=""),
    Column("agent_version", String(32), nullable=False, default=""),
    Column("architecture", String(32), nullable=False, default=""),
    Column("platform", String(64), nullable=False, default=""),
    Column("kernel_level", Integer, nullable=False, default=0),
    Column("heartbeat_rate", Integer, nullable=False, default=30),
    Column("replication_driver", String(16), nullable=False, default="SMT"),
    Column("system_info", Text, nullable=False, default="{}"),
    Column("system_disk_size", Integer, nullable=False, default=0),
    Column("disks", Text, nullable=False, default="[]"),  #: discovered disks, JSON (agent report)
    Column("machine_id", String(128), nullable=False),  #: what the agent reports; not an identity (clones share it)
    #: the agent's identity: a random id kept in its state dir ("machine:<id>" for agents older than it)
    Column("instance_id", String(160), nullable=False, default="", server_default=""),
    Column("agent_secret_hash", String(128), nullable=False),
    Column("registered_with", String(64), nullable=False, default=""),  #: at-… or AccessKey id
    Column("last_heartbeat_at", TS, nullable=True),
    Column("created_at", TS, nullable=False),
    UniqueConstraint("account_id", "instance_id", name="uq_sources_account_instance"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("account_id", String(32), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("source_id", String(32), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("region_id", String(64), nullable=False),
    Column("resource_group_id", String(64), nullable=False, default=""),
    Column("status", String(16), nullable=False, index=True),
    Column("business_status", String(16), nullable=False, default=""),
    Column("error_code", String(64), nullable=False, default=""),
    Column("status_info", Text, nullable=False, default=""),
    Column("progress", Float, nullable=False, default=0.0),
    Column("job_type", Integer, nullable=False, default=0),
    Column("target_type", String(32), nullable=False, default="Image"),
    Column("net_mode", Integer, nullable=False, default=0),
    Column("vpc_id", String(64), nullable=False, default=""),
    Column("vswitch_id", String(64), nullable=False, default=""),
    Column("instance_id", String(64), nullable=False, default=""),
    Column("transition_instance_id", String(64), nullable=False, default=""),
    Column("instance_type", String(64), nullable=False, default=""),
    Column("instance_ram_role", String(128), nullable=False, default=""),
    Column("image_name", String(128), nullable=False, default=""),
    Column("image_id", String(32), nullable=False, default=""),
    Column("container_namespace", String(128), nullable=False, default=""),
    Column("container_repository", String(128), nullable=False, default=""),
    Column("container_tag", String(128), nullable=False, default=""),
    Column("launch_template_id", String(64), nullable=False, default=""),
    Column("launch_template_version", String(32), nullable=False, default=""),
    Column("license_type", String(16), nullable=False, default=""),
    Column("replication_parameters", Text, nullable=False, default=""),
    Column("run_once", Boolean, nullable=False, default=True),
    Column("frequency", Integer, nullable=False, default=0),
    Column("max_images", Integer, nullable=False, default=0),
    Column("system_disk_size", Integer, nullable=False, default=0),
    #: the requested disk selection (SystemDiskParts, DataDisks, Disks), JSON
    Column("disk_spec", Text, nullable=False, default="{}"),
    #: cross-zone jobs (JobType 2): their own parameters, JSON
    Column("extra", Text, nullable=False, default="{}"),
    Column("created_at", TS, nullable=False),
    Column("start_time", TS, nullable=True),
    Column("end_time", TS, nullable=True),
    Column("scheduled_start_time", TS, nullable=True),
    Column("valid_time", TS, nullable=False),
    Column("next_run_at", TS, nullable=True, index=True),  #: when the orchestrator should start it
    Column("expired_at", TS, nullable=True),
    Column("has_run", Boolean, nullable=False, default=False),
    Column("final_run", Boolean, nullable=False, default=False),  #: cut-over with SyncData=true
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", TS, nullable=True),
    #: the receiver (its advertised endpoint) the job's current run sends to; NULL: the
    #: server's own --receiver-endpoint (no receiver registered, as before receivers registered)
    Column("receiver", String(255), nullable=True, index=True),
)
Index("uq_jobs_account_name", jobs.c.account_id, jobs.c.name, unique=True)
# DescribeReplicationJobs: every filter is an equality within one account, and pages are
# newest first, so each index leads with account_id and ends with the page order; the
# unfiltered listing and COUNT(*) use the first one.
# created_at DESC, id ASC: exactly the page order, so the page is read in index order and stops at LIMIT.
Index("ix_jobs_account_created", jobs.c.account_id, jobs.c.created_at.desc(), jobs.c.id)
Index("ix_jobs_account_status", jobs.c.account_id, jobs.c.status, jobs.c.created_at)
Index("ix_jobs_account_business", jobs.c.account_id, jobs.c.business_status, jobs.c.created_at)
Index("ix_jobs_account_type", jobs.c.account_id, jobs.c.job_type, jobs.c.created_at)
Index("ix_jobs_account_region", jobs.c.account_id, jobs.c.region_id, jobs.c.created_at)
Index("ix_jobs_account_rg", jobs.c.account_id, jobs.c.resource_group_id, jobs.c.created_at)
Index("ix_jobs_account_instance", jobs.c.account_id, jobs.c.instance_id)
Index("ix_jobs_account_source", jobs.c.account_id, jobs.c.source_id)

job_runs = Table(
    "job_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("type", String(16), nullable=False),
    Column("start_time", TS, nullable=False),
    Column("end_time", TS, nullable=True),
    Column("image_id", String(32), nullable=False, default=""),
    Column("bytes_total", BigInteger, nullable=False, default=0),
    Column("bytes_done", BigInteger, nullable=False, default=0),
    Column("checksum_verified", Boolean, nullable=True),
    Column("detail", Text, nullable=False, default="{}"),
)

#: Every status change, written in the same transaction as the change.
job_events = Table(
    "job_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), nullable=False, index=True),
    Column("at", TS, nullable=False),
    Column("event", String(32), nullable=False),
    Column("from_status", String(16), nullable=False),
    Column("from_business", String(16), nullable=False),
    Column("to_status", String(16), nullable=False),
    Column("to_business", String(16), nullable=False),
    Column("detail", Text, nullable=False, default=""),
)

tags = Table(
    "tags",
    metadata,
    Column("account_id", String(32), ForeignKey("accounts.id"), nullable=False),
    Column("resource_type", String(32), primary_key=True),
    Column("resource_id", String(32), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("value", String(128), nullable=False, default=""),
    Column("created_at", TS, nullable=False),
)
Index("ix_tags_account_key", tags.c.account_id, tags.c.key)

#: ClientToken idempotency: the first result of (account, action, token).
idempotency = Table(
    "idempotency",
    metadata,
    Column("account_id", String(32), primary_key=True),
    Column("action", String(64), primary_key=True),
    Column("client_token", String(64), primary_key=True),
    Column("params_hash", String(64), nullable=False),
    Column("result_id", String(32), nullable=False),
    Column("created_at", TS, nullable=False),
)

#: Images made by job runs (the data plane fills this in).
images = Table(
    "images",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("account_id", String(32), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("job_id", String(32), nullable=False, index=True),
    Column("run_id", Integer, nullable=True),
    Column("name", String(160), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", TS, nullable=False),
    Column("manifest", Text, nullable=False, default="{}"),
)

#: Receiver processes (`--roles receiver`), each under the endpoint it tells agents, renewed
#: every few seconds (service/receivers.py): the placement of runs and the handover of a dead one's.
receivers = Table(
    "receivers",
    metadata,
    Column("endpoint", String(255), primary_key=True),
    Column("instance", String(64), nullable=False),  #: the process holding it (its lease owner name)
    Column("capacity", Integer, nullable=False),  #: runs it takes at once (Preparing + Syncing)
    Column("started_at", TS, nullable=False),
    Column("heartbeat_at", TS, nullable=False),
)
