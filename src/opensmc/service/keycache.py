"""A per-process cache of verified AccessKeys: a signed request need not read and decrypt its key.

Looking the key up and opening its Fernet-sealed secret was a large part of
a signed request's cost. An entry holds (account id, secret) together with
the ``keys_version`` counter read **in the same transaction** as the key
row. Every request still writes its nonce in a transaction (its own, or one
shared with the requests that arrived meanwhile: ``api/nonces.py``), and
that transaction also reads ``keys_version``: if it moved since the entry
was read, some key was disabled, deleted or changed, the nonce is not
recorded, the entry is dropped, and the request is verified again from the
database. So a disabled key stops working at the very next request in every
process that shares the database, at the cost of one primary-key read.

Whoever disables, deletes or changes a key calls
``store.accounts.bump_keys_version(conn)`` in the transaction that does it.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from opensmc.store.db import Database

__all__ = ["MAX_ENTRIES", "CachedKey", "KeyCache", "cache_for"]

#: beyond this many keys the cache starts again empty (a bound on memory, not a policy)
MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class CachedKey:
    account_id: str
    secret: str
    version: int  #: keys_version when the key row was read
    policy: str = "FullAccess"  #: the key's policy (FullAccess or ReadOnly)


class KeyCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, CachedKey] = {}

    def get(self, key_id: str) -> CachedKey | None:
        return self._entries.get(key_id)

    def put(self, key_id: str, entry: CachedKey) -> None:
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key_id] = entry

    def drop(self, key_id: str) -> None:
        with self._lock:
            self._entries.pop(key_id, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_caches: weakref.WeakKeyDictionary[Database, KeyCache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def cache_for(db: Database) -> KeyCache:
    """The cache of one database (a process may talk to several, e.g. in tests)."""
    with _caches_lock:
        cache = _caches.get(db)
        if cache is None:
            cache = _caches[db] = KeyCache()
        return cache
