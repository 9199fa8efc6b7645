"""Who signed a request: AccessKey signature and nonce checks shared by every signed route.

The SMC RPC endpoint (:mod:`opensmc.api.app`) and the image download routes
(:mod:`opensmc.api.image_routes`) authenticate the same way: the image
routes call :func:`authenticate` on a worker thread; the RPC endpoint calls
:func:`authenticate_async`, which does the same checks with the key from the
verified-key cache on the event loop and records the nonce in a batch shared
with concurrent requests (:mod:`opensmc.api.nonces`), and falls back to
:func:`authenticate` for everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from opensmc.api.nonces import NonceBatcher
from opensmc.api.signing import SignedRequest, verify
from opensmc.api.threads import run_sync
from opensmc.service import accounts
from opensmc.service.context import Caller, Services
from opensmc.service.keycache import CachedKey, cache_for

T = TypeVar("T")

#: bodies larger than this are hashed (ACS3) on a worker thread, not on the event loop
LOOP_BODY_MAX = 64 << 10


class _NotCached(Exception):
    """The key is not in the verified-key cache: the database must be read."""


async def authenticate_async(services: Services, signed: SignedRequest, nonces: NonceBatcher) -> Caller:
    """:func:`authenticate`, without a worker thread of its own when the key is cached."""
    caller, _ = await authenticate_then(services, signed, nonces, lambda _caller: None, read_only=True)
    return caller


async def authenticate_then(
    services: Services, signed: SignedRequest, nonces: NonceBatcher, then: Callable[[Caller], T], *, read_only: bool
) -> tuple[Caller, T]:
    """:func:`authenticate`, then ``then(caller)`` on a worker thread: one thread hop when it can.

    ``read_only``: ``then`` only reads, so it may run on the read pool, in its
    nonce transaction's batch (:mod:`opensmc.api.threads`, :mod:`opensmc.api.nonces`).

    With the key in the verified-key cache, signature and freshness are
    checked on the event loop (memory only; HMAC of a small request is
    microseconds) and the nonce is recorded in a shared nonce transaction
    (:mod:`opensmc.api.nonces`); ``then`` runs once it is recorded. A key not
    cached, keys changed since it was cached, a large body, a nonce the
    database cannot hold alongside others, or a database that cannot take
    writes: :func:`authenticate` decides, on the worker thread that runs
    ``then``.
    """
    if len(signed.body) > LOOP_BODY_MAX:
        return await run_sync(lambda: _authenticate_then(services, signed, then))
    cache = cache_for(services.db)
    found: list[CachedKey] = []

    def lookup(key_id: str) -> str | None:
        hit = cache.get(key_id)
        if hit is None:
            raise _NotCached
        found.append(hit)
        return hit.secret

    try:
        cred = verify(signed, lookup, services.clock(), services.settings.signature_window)
    except _NotCached:
        return await run_sync(lambda: _authenticate_then(services, signed, then))
    if "\x00" in cred.nonce:
        # PostgreSQL text cannot hold NUL: such a nonce must not fail the shared transaction of
        # other requests. Alone, it fails as it always did (and a NUL parameter is refused anyway).
        return await run_sync(lambda: _authenticate_then(services, signed, then))
    key = found[0]
    caller = Caller(
        account_id=key.account_id,
        access_key_id=cred.access_key_id,
        scheme=cred.scheme,
        read_only=key.policy == accounts.READ_ONLY,
    )
    claim = accounts.NonceClaim(cred.access_key_id, cred.nonce, key.version)
    outcome, result = await nonces.claim_then(claim, lambda: then(caller), read_only=read_only)
    if outcome == accounts.RECORDED:
        assert result is not None
        return caller, result[0]
    if outcome == accounts.REPLAYED:
        raise accounts.NONCE_USED
    # STALE (the cached key may be disabled or gone: its entry is dropped) or IN_MEMORY
    return await run_sync(lambda: _authenticate_then(services, signed, then))


def _authenticate_then(services: Services, signed: SignedRequest, then: Callable[[Caller], T]) -> tuple[Caller, T]:
    caller = authenticate(services, signed)
    return caller, then(caller)


def authenticate(services: Services, signed: SignedRequest) -> Caller:
    """Verify the signature and freshness, reject a replayed nonce; return the caller.

    Blocking (database look-ups): call it on a worker thread. The key usually
    comes from the verified-key cache; if keys changed since it was cached, the
    nonce transaction says so and the request is verified again from the
    database (``service/keycache.py``).
    """
    caller = _attempt(services, signed, cached=True)
    if caller is None:  # AccessKeys changed since the cached look-up: the database decides
        caller = _attempt(services, signed, cached=False)
    assert caller is not None  # an uncached attempt never asks for another
    return caller


def _attempt(services: Services, signed: SignedRequest, *, cached: bool) -> Caller | None:
    found: list[CachedKey] = []

    def lookup(key_id: str) -> str | None:
        hit = accounts.lookup_secret(services, key_id, cached=cached)
        if hit is None:
            return None
        found.append(hit)
        return hit.secret

    cred = verify(signed, lookup, services.clock(), services.settings.signature_window)
    caller = Caller(
        account_id=found[0].account_id,
        access_key_id=cred.access_key_id,
        scheme=cred.scheme,
        read_only=found[0].policy == accounts.READ_ONLY,
    )
    # A key just read from the database needs no second look: no version to compare.
    version = found[0].version if cached else None
    return caller if accounts.check_nonce(services, caller, cred.nonce, key_version=version) else None
