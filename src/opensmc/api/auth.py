"""Who signed a request: AccessKey signature and nonce checks shared by every signed route.

The SMC RPC endpoint (:mod:`opensmc.api.app`) and the image download routes
(:mod:`opensmc.api.image_routes`) authenticate the same way, so both call
:func:`authenticate`.
"""

from __future__ import annotations

from opensmc.api.signing import SignedRequest, verify
from opensmc.service import accounts
from opensmc.service.context import Caller, Services


def authenticate(services: Services, signed: SignedRequest) -> Caller:
    """Verify the signature and freshness, reject a replayed nonce; return the caller.

    Blocking (database look-ups): call it on a worker thread.
    """
    found: dict[str, str] = {}

    def lookup(key_id: str) -> str | None:
        hit = accounts.lookup_key(services, key_id)
        if hit is None:
            return None
        found["account_id"], found["policy"] = hit[0], hit[2]
        return hit[1]

    cred = verify(signed, lookup, services.clock(), services.settings.signature_window)
    caller = Caller(
        account_id=found["account_id"],
        access_key_id=cred.access_key_id,
        scheme=cred.scheme,
        read_only=found["policy"] == accounts.READ_ONLY,
    )
    accounts.check_nonce(services, caller, cred.nonce)
    return caller
