"""Copying a whole OpenSMC database into another one (`opensmc db copy`): SQLite to PostgreSQL, say.

Both are first migrated to the current schema; the destination must be
empty (a fresh database: only the rows the migrations make). Every table is
copied in foreign-key order, in batches, inside one transaction on the
destination, so a failure leaves it as empty as it was. Times that SQLite
hands back without a zone are UTC (that is how they were written) and are
given the zone before they go into PostgreSQL's ``timestamptz``. On
PostgreSQL the sequences of integer keys are moved past the copied rows.

Run it with every server stopped: rows written to the source meanwhile
would not be copied. AccessKey secrets are copied sealed: the servers on the
destination need the same master key (``master.key`` or ``OPENSMC_MASTER_KEY``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, DateTime, Integer, Table, delete, func, insert, select, text

from opensmc.store.db import Database
from opensmc.store.migrate import upgrade
from opensmc.store.tables import keys_version, metadata

BATCH = 1000
#: rows the migrations make in an empty database (replaced by the source's)
MADE_BY_MIGRATIONS = {keys_version.name}


class CopyError(Exception):
    """The copy cannot be made (the message says why and what to do)."""


def _rows_in(conn: Connection, table: Table) -> int:
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _with_zone(table: Table, row: dict[str, Any]) -> dict[str, Any]:
    for col in table.columns:
        value = row.get(col.name)
        if isinstance(col.type, DateTime) and isinstance(value, datetime) and value.tzinfo is None:
            row[col.name] = value.replace(tzinfo=UTC)
    return row


def _reset_sequences(conn: Connection, table: Table) -> None:
    pk = list(table.primary_key.columns)
    if len(pk) != 1 or not isinstance(pk[0].type, Integer) or pk[0].autoincrement is False:
        return
    col = pk[0].name
    seq = conn.execute(text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table.name, "c": col}).scalar_one()
    if seq is None:
        return
    top = f'(SELECT MAX("{col}") FROM "{table.name}")'
    conn.execute(text(f"SELECT setval(:s, COALESCE({top}, 1), {top} IS NOT NULL)"), {"s": seq})


def copy_database(source: Database, destination: Database) -> dict[str, int]:
    """Copy every row of `source` into the empty `destination`; rows copied per table."""
    if source.url == destination.url:
        raise CopyError("--from and --to name the same database")
    upgrade(source)
    upgrade(destination)
    copied: dict[str, int] = {}
    with source.connect() as src, destination.begin() as dst:
        for table in metadata.sorted_tables:
            if table.name in MADE_BY_MIGRATIONS:
                continue
            n = _rows_in(dst, table)
            if n:
                raise CopyError(
                    f"the destination is not empty: table {table.name} has {n} row(s); copy into a new, empty database"
                )
        for table in metadata.sorted_tables:
            if table.name in MADE_BY_MIGRATIONS:
                dst.execute(delete(table))
            order = list(table.primary_key.columns)
            result = src.execute(select(table).order_by(*order)).mappings()
            total = 0
            while batch := result.fetchmany(BATCH):
                dst.execute(insert(table), [_with_zone(table, dict(r)) for r in batch])
                total += len(batch)
            copied[table.name] = total
            if destination.engine.dialect.name == "postgresql":
                _reset_sequences(dst, table)
    return copied
