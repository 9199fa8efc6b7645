"""Who signed a request: AccessKey signature and nonce checks shared by every signed route.

The SMC RPC endpoint (:mod:`opensmc.api.app`) and the image download routes
(:mod:`opensmc.api.image_routes`) authenticate the same way, so both call
:func:`authenticate`.
"""

from __future__ import annotations

from opensmc.api.signing import SignedRequest, verify
from opensmc.service import accounts
from opensmc.service.context import Caller, Services
from opensmc.service.keycache import CachedKey


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
