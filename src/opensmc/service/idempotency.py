"""ClientToken handling for the Create* actions."""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import Connection

from opensmc.domain.errors import Conflict, InvalidParameter
from opensmc.params import Params
from opensmc.store import idempotency as q


def client_token(p: Params) -> str | None:
    token = p.str("ClientToken", max_len=64)
    if token is not None and not token.isascii():
        raise InvalidParameter(p.wire("ClientToken"), "It must be ASCII.")
    return token or None


def params_hash(p: Params) -> str:
    items = sorted((k, p.raw(k) or "") for k in p.keys() if k != "ClientToken")
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def replay(conn: Connection, account_id: str, action: str, token: str | None, digest: str) -> str | None:
    """The earlier result id for this token, None if new; a different request with it is an error."""
    if token is None:
        return None
    found = q.lookup(conn, account_id, action, token)
    if found is None:
        return None
    if found[0] != digest:
        raise Conflict(
            "IdempotentParameterMismatch",
            "The request uses the same ClientToken as a previous, but non-identical request. "
            "Use a new ClientToken or repeat the original parameters.",
        )
    return found[1]
