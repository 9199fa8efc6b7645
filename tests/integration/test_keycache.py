"""The verified-key cache, the nonce check and deferred reads, with two "processes" on one database.

Each process is a separate ``Database`` (its own connection pool) with its
own key cache, as two server processes sharing the database are.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from sqlalchemy import text, update

from opensmc import API_VERSION
from opensmc.api.auth import authenticate
from opensmc.api.signing import SignedRequest
from opensmc.domain.errors import AuthError
from opensmc.service.accounts import KeyPair, create_account
from opensmc.service.context import Services
from opensmc.service.keycache import cache_for
from opensmc.signer import sign_v1
from opensmc.store import accounts as q
from opensmc.store.db import Database, sqlite_url
from opensmc.store.tables import access_keys


def _signed(key: KeyPair, nonce: str | None = None) -> SignedRequest:
    qs = sign_v1("GET", "DescribeSourceServers", API_VERSION, {}, key.access_key_id, key.access_key_secret, nonce=nonce)
    return SignedRequest("GET", "/", parse_qsl(qs, keep_blank_values=True), [], {}, b"")


@pytest.fixture
def other_process(services: Services) -> Services:
    """Another server process on the same database: its own engine, pool and key cache."""
    db = Database(services.db.url if not services.db.is_sqlite else sqlite_url(_sqlite_path(services.db)))
    return Services(db=db, settings=services.settings, secrets=services.secrets)


def _sqlite_path(db: Database) -> Path:
    return Path(db.url.removeprefix("sqlite:///"))


def _disable(svc: Services, key: KeyPair, *, bump: bool) -> None:
    with svc.db.begin() as conn:
        conn.execute(update(access_keys).where(access_keys.c.id == key.access_key_id).values(enabled=False))
        if bump:
            q.bump_keys_version(conn)


def test_cached_key_is_used_and_a_disabled_key_fails_at_once_everywhere(
    services: Services, other_process: Services
) -> None:
    key = create_account(services, "k")
    assert authenticate(services, _signed(key)).account_id == key.account_id
    assert cache_for(services.db).get(key.access_key_id) is not None
    # Disabled without bumping keys_version: the cache still answers, which is why the bump is required.
    _disable(other_process, key, bump=False)
    assert authenticate(services, _signed(key)).access_key_id == key.access_key_id
    # With the bump (as every disable/delete must), the next request in this process is refused...
    with services.db.begin() as conn:
        q.bump_keys_version(conn)
    with pytest.raises(AuthError) as err:
        authenticate(services, _signed(key))
    assert err.value.code == "InvalidAccessKeyId.NotFound"
    assert cache_for(services.db).get(key.access_key_id) is None


def test_disable_in_another_process_invalidates_this_cache(services: Services, other_process: Services) -> None:
    key = create_account(services, "k")
    kept = create_account(services, "kept")
    authenticate(services, _signed(key))
    authenticate(services, _signed(kept))
    _disable(other_process, key, bump=True)
    with pytest.raises(AuthError) as err:
        authenticate(services, _signed(key))
    assert err.value.code == "InvalidAccessKeyId.NotFound"
    # another key still works (re-read once, then cached again at the new version)
    assert authenticate(services, _signed(kept)).access_key_id == kept.access_key_id
    v = cache_for(services.db).get(kept.access_key_id)
    assert v is not None and v.version == q_version(services)


def q_version(svc: Services) -> int:
    with svc.db.connect() as conn:
        return q.get_keys_version(conn)


def test_a_refused_stale_attempt_does_not_burn_the_nonce(services: Services, other_process: Services) -> None:
    key = create_account(services, "k")
    authenticate(services, _signed(key))
    with other_process.db.begin() as conn:
        q.bump_keys_version(conn)  # some other key changed
    req = _signed(key, nonce="n-once")
    assert authenticate(services, req).access_key_id == key.access_key_id  # verified again, then accepted
    with pytest.raises(AuthError) as err:
        authenticate(services, req)
    assert err.value.code == "SignatureNonceUsed"


def test_nonce_replay_refused_across_processes(services: Services, other_process: Services) -> None:
    key = create_account(services, "k")
    req = _signed(key, nonce="same-nonce")
    authenticate(services, req)
    with pytest.raises(AuthError) as err:
        authenticate(other_process, req)
    assert err.value.code == "SignatureNonceUsed"


def test_sqlite_reads_do_not_wait_for_a_writer(services: Services, other_process: Services) -> None:
    if not services.db.is_sqlite:
        pytest.skip("SQLite's locking")
    with other_process.db.begin() as writer:  # BEGIN IMMEDIATE: holds the write lock
        writer.execute(text("UPDATE keys_version SET version = version + 1"))
        with services.db.connect() as reader:
            reader.exec_driver_sql("PRAGMA busy_timeout = 0")  # a lock wait would fail at once
            assert reader.execute(text("SELECT count(*) FROM accounts")).scalar_one() >= 0
            reader.exec_driver_sql("PRAGMA busy_timeout = 30000")
        with pytest.raises(Exception, match="locked"):  # while a second writer does wait for it
            with services.db.begin() as second:
                second.exec_driver_sql("PRAGMA busy_timeout = 0")
                second.execute(text("UPDATE keys_version SET version = version + 1"))


def test_nonces_written_raw_are_purged_by_age(services: Services) -> None:
    """The hot-path INSERT stores seen_at in the column's own format: the purge compares it right."""
    from datetime import timedelta

    from opensmc.service.accounts import purge_nonces

    now = services.clock()
    with services.db.begin() as conn:
        assert q.remember_nonce(conn, "LTAIx", "old", now - services.settings.signature_window * 3)
        assert q.remember_nonce(conn, "LTAIx", "new", now - timedelta(seconds=1))
        assert not q.remember_nonce(conn, "LTAIx", "new", now)  # a replay
    assert purge_nonces(services) == 1
    with services.db.begin() as conn:
        assert q.remember_nonce(conn, "LTAIx", "old", now)  # forgotten: may be seen again
        assert not q.remember_nonce(conn, "LTAIx", "new", now)  # kept
