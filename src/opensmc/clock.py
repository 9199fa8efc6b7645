"""Time and identifiers, in one place so tests can control them."""

from __future__ import annotations

import os
import secrets
import string
from datetime import UTC, datetime

_ALNUM = string.ascii_lowercase + string.digits


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def new_id(prefix: str) -> str:
    """An SMC-style ID: a prefix and 20 lower-case alphanumerics (`j-bp19vlwm0tyigbmj1234`)."""
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(20))


def new_request_id() -> str:
    """An upper-case random (version 4) UUID, as the real service's RequestId."""
    # uuid.uuid4() with fewer steps (every API answer makes one): 16 random bytes, the
    # version and variant bits set as uuid.UUID(version=4) sets them.
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex().upper()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def iso(dt: datetime | None) -> str:
    """ISO 8601 UTC `yyyy-MM-ddTHH:mm:ssZ`, or "" for None."""
    if dt is None:
        return ""
    if dt.tzinfo is not None and dt.utcoffset():  # naive (SQLite) and UTC need no conversion
        dt = dt.astimezone(UTC)
    # isoformat, not strftime: a third of the time, and a page of 50 jobs formats 250 of them
    return dt.isoformat(timespec="seconds")[:19] + "Z"


def as_utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; they are UTC."""
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
