"""`opensmc db copy`: an embedded install's SQLite database moved onto a new PostgreSQL database."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, make_url, select, text

from opensmc.service.accounts import create_account, lookup_secret
from opensmc.service.context import Caller, Services, Settings
from opensmc.store.db import Database, normalize_url, sqlite_url
from opensmc.store.migrate import upgrade
from opensmc.store.secretbox import SecretBox
from opensmc.store.tables import metadata
from tests.conftest import PG_URL, SECRET_KEY, ActionCaller, _pg_available
from tests.integration.jobs_support import add_source

pytestmark = pytest.mark.postgres


@pytest.fixture
def empty_pg() -> Iterator[str]:
    if not _pg_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
    admin = create_engine(normalize_url(PG_URL), isolation_level="AUTOCOMMIT")
    name = f"opensmc_copy_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(normalize_url(PG_URL)).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def services_on(db: Database, tmp_path: Path) -> Services:
    settings = Settings(data_dir=tmp_path / "data", public_endpoint="http://127.0.0.1:0")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Services(db=db, settings=settings, secrets=SecretBox(SECRET_KEY))


def counts(db: Database) -> dict[str, int]:
    with db.connect() as conn:
        return {
            t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one()) for t in metadata.sorted_tables
        }


def copy(src: str, dst: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opensmc.cli.main", "db", "copy", "--from", src, "--to", dst],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sqlite_install_copied_to_postgresql(tmp_path: Path, empty_pg: str) -> None:
    src_url = sqlite_url(tmp_path / "opensmc.db")
    src_db = Database(src_url)
    upgrade(src_db)
    svc = services_on(src_db, tmp_path)
    pair = create_account(svc, "team")
    caller = Caller(account_id=pair.account_id, access_key_id=pair.access_key_id)
    call = ActionCaller(svc, caller)
    source = add_source(svc, caller)
    job = call("CreateReplicationJob", RegionId="local", SourceId=source, Name="moved", Description="é 𝄞")["JobId"]
    call("StartReplicationJob", JobId=job)  # a run and events: rows with integer keys
    call("TagResources", ResourceType="sourceserver", ResourceId__1=source, Tag__1__Key="k", Tag__1__Value="v")
    before = counts(src_db)
    described = call("DescribeReplicationJobs", JobId__1=job)["ReplicationJobs"]["ReplicationJob"][0]
    src_db.dispose()

    done = copy(src_url, empty_pg)
    assert done.returncode == 0, done.stderr
    assert '"copied"' in done.stdout

    dst_db = Database(empty_pg)
    try:
        assert counts(dst_db) == before
        dst = services_on(dst_db, tmp_path)
        moved = ActionCaller(dst, caller)
        again = moved("DescribeReplicationJobs", JobId__1=job)["ReplicationJobs"]["ReplicationJob"][0]
        assert again == described  # times with their zone, text, tags, runs: all the same
        # The AccessKey secret still opens with the same master key, and new rows get new keys.
        found = lookup_secret(dst, pair.access_key_id, cached=False)
        assert found is not None and found.secret == pair.access_key_secret
        # New rows with integer keys (a run, its events) on the destination: the sequences moved past the copy.
        other = moved("CreateReplicationJob", RegionId="local", SourceId=add_source(dst, caller), Name="new")["JobId"]
        moved("StartReplicationJob", JobId=other)
        assert counts(dst_db)["job_runs"] == before["job_runs"] + 1
    finally:
        dst_db.dispose()

    # A destination that holds data is refused, and left alone.
    refused = copy(src_url, empty_pg)
    assert refused.returncode != 0
    assert "the destination is not empty" in refused.stderr and "Traceback" not in refused.stderr
    unreachable = copy(src_url, "postgresql://nobody@127.0.0.1:1/none")
    assert unreachable.returncode != 0 and "Traceback" not in unreachable.stderr, unreachable.stderr
