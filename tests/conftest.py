"""Fixtures shared by every test folder.

Store-backed tests run twice: on SQLite (a fresh file per test) and on
PostgreSQL (the server named by ``OPENSMC_TEST_PG_URL``, default
``postgresql://postgres@127.0.0.1:5432/test``; tables are emptied between
tests). Set ``OPENSMC_TEST_PG_URL=skip`` to run without PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings
from sqlalchemy import create_engine, make_url, text

from opensmc.params import Params
from opensmc.service.accounts import create_account
from opensmc.service.context import Caller, Services, Settings
from opensmc.store.db import Database, normalize_url, sqlite_url
from opensmc.store.migrate import upgrade
from opensmc.store.secretbox import SecretBox
from opensmc.store.tables import metadata

# No Hypothesis deadlines anywhere: these machines are shared and noisy, and a test
# must fail on behaviour, never on how long an example took.
hypothesis_settings.register_profile("opensmc", deadline=None)
hypothesis_settings.load_profile("opensmc")

PG_URL = os.environ.get("OPENSMC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SECRET_KEY = b"3q2-7wEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="  # a fixed Fernet key for tests


def _pg_available() -> bool:
    if PG_URL == "skip":
        return False
    try:
        db = Database(PG_URL)
        with db.connect() as conn:
            conn.execute(text("SELECT 1"))
        db.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("db") / "template.db"
    db = Database(sqlite_url(path))
    upgrade(db)
    db.dispose()
    return path


@pytest.fixture(scope="session")
def pg_database() -> Iterator[Database]:
    """A database of its own for this test session, dropped at the end.

    Its own database (not the shared `test` one) so that parallel test runs on
    one server never see each other's rows.
    """
    if not _pg_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_URL} (set OPENSMC_TEST_PG_URL)")
    admin = create_engine(normalize_url(PG_URL), isolation_level="AUTOCOMMIT")
    name = f"opensmc_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(normalize_url(PG_URL)).set(database=name)
    db = Database(url.render_as_string(hide_password=False))
    upgrade(db)
    yield db
    db.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        path = tmp_path / "opensmc.db"
        shutil.copy(sqlite_template, path)
        db = Database(sqlite_url(path))
        yield db
        db.dispose()
    else:
        db = request.getfixturevalue("pg_database")
        with db.begin() as conn:
            names = ", ".join(t.name for t in reversed(metadata.sorted_tables))
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        yield db


@pytest.fixture
def services(database: Database, tmp_path: Path) -> Services:
    settings = Settings(data_dir=tmp_path / "data", public_endpoint="http://127.0.0.1:0")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Services(db=database, settings=settings, secrets=SecretBox(SECRET_KEY))


@pytest.fixture
def caller(services: Services) -> Caller:
    pair = create_account(services, "tester")
    return Caller(account_id=pair.account_id, access_key_id=pair.access_key_id)


@pytest.fixture
def other_caller(services: Services) -> Caller:
    pair = create_account(services, "someone-else")
    return Caller(account_id=pair.account_id, access_key_id=pair.access_key_id)


class ActionCaller:
    """Calls registered action handlers directly with wire-style string parameters."""

    def __init__(self, services: Services, caller: Caller) -> None:
        self.services = services
        self.caller = caller

    def __call__(self, action: str, **params: Any) -> dict[str, Any]:
        from opensmc.api.actions import ACTIONS

        flat = {k.replace("__", "."): _wire(v) for k, v in params.items()}
        return ACTIONS[action].handler(self.services, self.caller, Params(flat))


def _wire(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


@pytest.fixture
def call(services: Services, caller: Caller) -> ActionCaller:
    """`call("CreateWorkgroup", Name="wg", Tag__1__Key="k")`: `__` stands for `.`."""
    return ActionCaller(services, caller)


# -- a real S3 server (Ceph RGW) for the object-storage backend ---------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Ceph cluster and RADOS Gateway for the session (``tests/s3server.py``).

    Skipped only when Ceph is not installed; a Ceph that is installed but does
    not start is an error, not a skip.
    """
    from tests import s3server

    missing = s3server.missing_binaries()
    if missing:
        pytest.skip(f"no Ceph to run an S3 server: {', '.join(missing)} not found (scripts/setup installs them)")
    server = s3server.start(tmp_path_factory.mktemp("ceph"))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: Any) -> str:
    """A new, empty bucket on the session's S3 server."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:20]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The AWS variables for the S3 server, set in this process (and so in children)."""
    env: dict[str, str] = s3_server.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
