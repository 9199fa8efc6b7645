"""Time and identifiers, in one place so tests can control them."""

from __future__ import annotations

import random
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
    # uuid.uuid4() with fewer steps (every API answer makes one): 128 random bits, the version and
    # variant bits set as uuid.UUID(version=4) sets them. From `random`, not os.urandom: a RequestId
    # names a call in logs and guards nothing, and os.urandom is a system call that lets go of the
    # GIL on the event loop's thread, which then waits to take it back from a worker.
    n = (_request_ids.getrandbits(128) & ~(0xF000 << 64) | (0x4000 << 64)) & ~(0xC000 << 48) | (0x8000 << 48)
    h = f"{n:032X}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


#: seeded from os.urandom once per process
_request_ids = random.Random()


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
