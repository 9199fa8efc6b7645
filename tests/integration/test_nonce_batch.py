"""The RPC endpoint's authentication: cached keys on the event loop, nonces in shared transactions.

``authenticate_async`` must refuse what ``authenticate`` refuses: a nonce
replayed in this process, in the same batch or in another process; a key
disabled anywhere since it was cached. Each "process" is its own Database.
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl

import pytest
from sqlalchemy import update

from opensmc import API_VERSION
from opensmc.api.auth import authenticate, authenticate_async
from opensmc.api.nonces import NonceBatcher
from opensmc.api.signing import SignedRequest
from opensmc.domain.errors import AuthError, ServerDiskFull
from opensmc.service import accounts
from opensmc.service.accounts import KeyPair, create_account
from opensmc.service.context import Services
from opensmc.service.keycache import cache_for
from opensmc.signer import sign_v1
from opensmc.store import accounts as q
from opensmc.store.db import Database, sqlite_url
from opensmc.store.tables import access_keys, nonces


def _signed(key: KeyPair, nonce: str | None = None) -> SignedRequest:
    qs = sign_v1("GET", "DescribeSourceServers", API_VERSION, {}, key.access_key_id, key.access_key_secret, nonce=nonce)
    return SignedRequest("GET", "/", parse_qsl(qs, keep_blank_values=True), [], {}, b"")


@pytest.fixture
def other_process(services: Services) -> Services:
    url = services.db.url if not services.db.is_sqlite else sqlite_url(_path(services.db))
    return Services(db=Database(url), settings=services.settings, secrets=services.secrets)


def _path(db: Database) -> str:
    return db.url.removeprefix("sqlite:///")


def _codes(results: list[object]) -> list[str]:
    return [r.code if isinstance(r, AuthError) else "OK" for r in results]


def _count_nonce_transactions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one for each transaction that inserts nonces (the claims it holds)."""
    seen: list[int] = []
    real = q.claim_nonces

    def counting(db: Database, claims: list[tuple[str, str, int | None]], now: object) -> object:
        seen.append(len(claims))
        return real(db, claims, now)  # type: ignore[arg-type]

    monkeypatch.setattr(q, "claim_nonces", counting)
    return seen


def test_concurrent_requests_share_nonce_transactions_and_all_pass(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = create_account(services, "k")
    authenticate(services, _signed(key))  # the key is cached from here on
    batcher = NonceBatcher(services)
    inserts = _count_nonce_transactions(monkeypatch)

    async def many() -> list[object]:
        reqs = [_signed(key) for _ in range(60)]
        return await asyncio.gather(*(authenticate_async(services, r, batcher) for r in reqs), return_exceptions=True)

    results = asyncio.run(many())
    assert _codes(results) == ["OK"] * 60
    assert sum(inserts) == 60
    assert len(inserts) < 60  # some requests shared a transaction (the first flush has one, the next the rest)
    with services.db.connect() as conn:
        assert conn.execute(nonces.select().where(nonces.c.access_key_id == key.access_key_id)).all()


def test_a_nonce_twice_in_one_batch_passes_once(services: Services) -> None:
    key = create_account(services, "k")
    authenticate(services, _signed(key))
    batcher = NonceBatcher(services)
    req = _signed(key, nonce="twice")

    async def both() -> list[object]:
        calls = (authenticate_async(services, req, batcher) for _ in range(3))
        return await asyncio.gather(*calls, return_exceptions=True)

    assert sorted(_codes(asyncio.run(both()))) == ["OK", "SignatureNonceUsed", "SignatureNonceUsed"]


def test_nonce_replay_refused_across_processes_and_paths(services: Services, other_process: Services) -> None:
    key = create_account(services, "k")
    authenticate(services, _signed(key))
    authenticate(other_process, _signed(key))
    here, there = NonceBatcher(services), NonceBatcher(other_process)
    first = _signed(key, nonce="across")
    assert asyncio.run(authenticate_async(services, first, here)).access_key_id == key.access_key_id
    for svc, batcher in ((other_process, there), (services, here)):
        with pytest.raises(AuthError) as err:
            asyncio.run(authenticate_async(svc, first, batcher))
        assert err.value.code == "SignatureNonceUsed"
    with pytest.raises(AuthError) as err:  # and the thread path sees what the batch recorded
        authenticate(other_process, first)
    assert err.value.code == "SignatureNonceUsed"
    second = _signed(key, nonce="thread-first")
    authenticate(other_process, second)
    with pytest.raises(AuthError) as err:
        asyncio.run(authenticate_async(services, second, here))
    assert err.value.code == "SignatureNonceUsed"


def test_a_key_disabled_in_another_process_fails_at_the_next_request(
    services: Services, other_process: Services
) -> None:
    key = create_account(services, "k")
    batcher = NonceBatcher(services)
    asyncio.run(authenticate_async(services, _signed(key), batcher))  # not cached yet: the thread path caches it
    assert cache_for(services.db).get(key.access_key_id) is not None
    assert asyncio.run(authenticate_async(services, _signed(key), batcher)).account_id == key.account_id
    with other_process.db.begin() as conn:
        conn.execute(update(access_keys).where(access_keys.c.id == key.access_key_id).values(enabled=False))
        q.bump_keys_version(conn)
    req = _signed(key, nonce="after-disable")
    with pytest.raises(AuthError) as err:
        asyncio.run(authenticate_async(services, req, batcher))
    assert err.value.code == "InvalidAccessKeyId.NotFound"
    assert cache_for(services.db).get(key.access_key_id) is None
    with services.db.connect() as conn:  # the refused request's nonce was not recorded
        assert not q.nonce_used(conn, key.access_key_id, "after-disable")


def test_a_stale_cached_key_is_verified_again_and_its_nonce_kept_once(
    services: Services, other_process: Services
) -> None:
    key = create_account(services, "k")
    authenticate(services, _signed(key))
    with other_process.db.begin() as conn:
        q.bump_keys_version(conn)  # some other key changed
    batcher = NonceBatcher(services)
    req = _signed(key, nonce="stale-once")
    assert asyncio.run(authenticate_async(services, req, batcher)).access_key_id == key.access_key_id
    with pytest.raises(AuthError) as err:
        asyncio.run(authenticate_async(services, req, batcher))
    assert err.value.code == "SignatureNonceUsed"


def test_a_database_that_cannot_take_the_batch_falls_back_to_memory(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = create_account(services, "k")
    authenticate(services, _signed(key))
    real_begin = services.db.begin

    def full(*_args: object) -> object:
        raise ServerDiskFull("full")

    monkeypatch.setattr(services.db, "begin", full)
    monkeypatch.setattr(q, "claim_nonces", full)  # the shared transactions, on the driver's connection
    batcher = NonceBatcher(services)
    req = _signed(key, nonce="while-full")
    try:
        assert asyncio.run(authenticate_async(services, req, batcher)).access_key_id == key.access_key_id
        assert accounts.record_nonces(services, [accounts.NonceClaim(key.access_key_id, "x", None)]) == [
            accounts.IN_MEMORY
        ]
        with pytest.raises(AuthError) as err:
            asyncio.run(authenticate_async(services, req, batcher))
        assert err.value.code == "SignatureNonceUsed"
    finally:
        monkeypatch.setattr(services.db, "begin", real_begin)
        accounts._memory_nonces.clear()


def test_a_nonce_the_database_cannot_store_does_not_fail_the_others(services: Services) -> None:
    key = create_account(services, "k")
    authenticate(services, _signed(key))
    batcher = NonceBatcher(services)

    async def together() -> list[object]:
        # last: the first requests start transactions of their own, it joins a shared one
        reqs = [*(_signed(key) for _ in range(10)), _signed(key, nonce="bad\x00nonce")]
        return await asyncio.gather(*(authenticate_async(services, r, batcher) for r in reqs), return_exceptions=True)

    results = asyncio.run(together())
    assert all(not isinstance(r, BaseException) for r in results[:-1]), results[:-1]


def test_a_lone_request_records_its_nonce_on_the_thread_that_runs_it(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from opensmc.api.auth import authenticate_then

    key = create_account(services, "k")
    authenticate(services, _signed(key))
    threads: dict[str, int] = {}
    real = accounts.record_nonces

    def recording(svc: Services, claims: list[accounts.NonceClaim]) -> list[str]:
        threads["nonce"] = threading.get_ident()
        return real(svc, claims)

    monkeypatch.setattr(accounts, "record_nonces", recording)

    def then(caller: object) -> str:
        threads["handler"] = threading.get_ident()
        return "ran"

    caller, result = asyncio.run(
        authenticate_then(services, _signed(key), NonceBatcher(services), then, read_only=True)
    )
    assert result == "ran" and caller.access_key_id == key.access_key_id
    assert threads["nonce"] == threads["handler"] != threading.get_ident()
