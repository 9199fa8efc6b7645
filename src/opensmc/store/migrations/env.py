"""Alembic environment: runs migrations on the connection handed in by ``opensmc.store.migrate``."""

from __future__ import annotations

from alembic import context

from opensmc.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only via `alembic` CLI with a URL
    from sqlalchemy import create_engine

    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    connection = engine.connect()

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
