"""Activation codes (CreateAccessToken and friends) and the secret hashing agents rely on.

A code lets up to ``Count`` new sources register during ``TimeToLiveInDays``
days after its creation. Statuses (spec/API.md §1.9): ``unactivated`` while
no source used it, ``activated`` once one did, ``expired`` past its TTL or
once disabled (the enum has no "disabled").
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from opensmc.clock import as_utc, new_id
from opensmc.domain.enums import TokenStatus
from opensmc.domain.errors import NotFound
from opensmc.service.context import Caller, Services
from opensmc.store import tokens as q

_CODE_ALPHABET = string.ascii_letters + string.digits
CODE_LENGTH = 32
NOT_FOUND_CODE = "InvalidAccessTokenId.NotFound"


# -- secrets -----------------------------------------------------------------------------------------------


def hash_secret(secret: str) -> str:
    """``sha256$<salt>$<hex digest>`` with a fresh 16-byte salt: what is stored instead of a secret."""
    salt = secrets.token_hex(16)
    digest = hashlib.sha256((salt + secret).encode()).hexdigest()
    return f"sha256${salt}${digest}"


def verify_secret(secret: str, stored: str) -> bool:
    """Whether `secret` is the one `stored` was made from (constant-time compare)."""
    scheme, _, rest = stored.partition("$")
    salt, _, digest = rest.partition("$")
    if scheme != "sha256" or not salt or not digest:
        return False
    actual = hashlib.sha256((salt + secret).encode()).hexdigest()
    return hmac.compare_digest(actual, digest)


def new_code() -> str:
    """A 32-character alphanumeric activation code, like SMC's `B57QoTXEA2Tytr0uZWoNY5Aju5Jt****`."""
    return "".join(secrets.choice(_CODE_ALPHABET) for _ in range(CODE_LENGTH))


# -- the token as the API shows it -------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    id: str
    account_id: str
    name: str
    description: str
    count: int
    registered_count: int
    ttl_days: int
    disabled: bool
    created_at: datetime
    code_hash: str

    @classmethod
    def from_row(cls, row: Any) -> Token:
        created = as_utc(row.created_at)
        assert created is not None
        return cls(
            id=row.id,
            account_id=row.account_id,
            name=row.name,
            description=row.description,
            count=int(row.count),
            registered_count=int(row.registered_count),
            ttl_days=int(row.ttl_days),
            disabled=bool(row.disabled),
            created_at=created,
            code_hash=row.code_hash,
        )

    @property
    def expires_at(self) -> datetime:
        return self.created_at + timedelta(days=self.ttl_days)

    def is_expired(self, now: datetime) -> bool:
        return now >= self.expires_at

    def status(self, now: datetime) -> TokenStatus:
        if self.disabled or self.is_expired(now):
            return TokenStatus.EXPIRED
        return TokenStatus.ACTIVATED if self.registered_count > 0 else TokenStatus.UNACTIVATED


# -- use cases ---------------------------------------------------------------------------------------------


def create(svc: Services, caller: Caller, *, name: str, description: str, count: int, ttl_days: int) -> tuple[str, str]:
    """(AccessTokenId, AccessTokenCode). The code is returned only here; a salted hash is kept."""
    token_id = new_id("at-")
    code = new_code()
    with svc.db.begin() as conn:
        q.insert_token(
            conn,
            token_id=token_id,
            account_id=caller.account_id,
            name=name,
            description=description,
            code_hash=hash_secret(code),
            count=count,
            ttl_days=ttl_days,
            now=svc.clock(),
        )
    return token_id, code


def delete(svc: Services, caller: Caller, token_id: str) -> None:
    """Sources already registered with the code are not affected."""
    with svc.db.begin() as conn:
        if not q.delete_token(conn, caller.account_id, token_id):
            raise NotFound("AccessTokenId", token_id, code=NOT_FOUND_CODE)


def disable(svc: Services, caller: Caller, token_id: str) -> None:
    """No new registrations; sources already registered are not affected. Disabling twice is fine."""
    with svc.db.begin() as conn:
        if not q.disable_token(conn, caller.account_id, token_id):
            raise NotFound("AccessTokenId", token_id, code=NOT_FOUND_CODE)


def list_tokens(
    svc: Services, caller: Caller, *, ids: list[str], name: str | None, status: TokenStatus | None
) -> list[Token]:
    now = svc.clock()
    with svc.db.connect() as conn:
        rows = q.list_tokens(conn, caller.account_id, ids, name)
    found = [Token.from_row(r) for r in rows]
    if status is not None:
        found = [t for t in found if t.status(now) is status]
    return found
