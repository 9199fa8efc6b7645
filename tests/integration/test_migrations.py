"""The Alembic migrations produce exactly the schema `store/tables.py` declares, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from opensmc.store.db import Database
from opensmc.store.migrate import current
from opensmc.store.tables import metadata


def test_migrated_schema_equals_the_declared_one(database: Database) -> None:
    # The `database` fixture is migrated with `opensmc.store.migrate.upgrade`.
    assert current(database) is not None
    with database.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
