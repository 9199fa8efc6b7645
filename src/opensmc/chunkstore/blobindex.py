"""The in-memory blob index of a :class:`~.repository.Repository`: blob hash -> location, compact.

A Python dict from a 16-byte ``bytes`` to an ``int`` costs about 140 bytes a
blob (the table slot, the key object, the value object): 29 MiB for the
210,000 blobs of an 8 GiB disk at 40 % use, the largest thing in the
receiver that grows with the data. Here most entries live in four sorted
NumPy columns, 32 bytes a blob: the hash's two 64-bit halves (sorted on the
first) and the location's two halves. New entries go into a small dict
first and are merged into the columns once it holds :data:`MERGE_AT` of
them (or 1/16 of the columns, whichever is more: merging costs a pass over
the columns). A lookup asks the dict, then bisects the first column.

Not thread-safe: the repository calls it under its lock. Locations are the
repository's ints (``_pack_location``), below 2**128.
"""

from __future__ import annotations

from bisect import bisect_left

import numpy as np

__all__ = ["BlobIndex"]

#: entries in the dict before it is merged into the columns (at least)
MERGE_AT = 16 * 1024
_M64 = (1 << 64) - 1


def _halves(blob_hash: bytes) -> tuple[int, int]:
    return int.from_bytes(blob_hash[:8], "little"), int.from_bytes(blob_hash[8:16], "little")


class BlobIndex:
    def __init__(self) -> None:
        self._recent: dict[bytes, int] = {}
        # Rows of the columns that no longer count: forgotten, or superseded by a newer entry
        # in the dict (so that a live row and a dict entry never share a hash).
        self._dead: set[int] = set()
        self._set_columns(*(np.empty(0, np.uint64) for _ in range(4)))

    def _set_columns(self, k: np.ndarray, r: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> None:
        self._k, self._r, self._hi, self._lo = k, r, hi, lo
        # memoryviews of the columns: indexing one gives a Python int, bisect works on it, and
        # both are much faster than NumPy's per-element calls.
        self._kv, self._rv, self._hiv, self._lov = (c.data.cast("B").cast("Q") for c in (k, r, hi, lo))

    def __len__(self) -> int:
        return len(self._k) - len(self._dead) + len(self._recent)

    def _row(self, blob_hash: bytes) -> int | None:
        """The live row of the columns holding ``blob_hash``, if any."""
        k, r = _halves(blob_hash)
        kv, n = self._kv, len(self._kv)
        i = bisect_left(kv, k)
        while i < n and kv[i] == k:  # (two hashes with one first half: a few in 2**64)
            if self._rv[i] == r and i not in self._dead:
                return i
            i += 1
        return None

    def __contains__(self, blob_hash: object) -> bool:
        if not isinstance(blob_hash, bytes):
            return False
        return blob_hash in self._recent or self._row(blob_hash) is not None

    def get(self, blob_hash: bytes) -> int | None:
        v = self._recent.get(blob_hash)
        if v is not None:
            return v
        i = self._row(blob_hash)
        return None if i is None else self._hiv[i] << 64 | self._lov[i]

    def _rows(self, hashes: list[bytes]) -> list[int]:
        """The live row of each hash in the columns, -1 where none: one vectorised search."""
        n = len(self._k)
        if not n or not hashes:
            return [-1] * len(hashes)
        q = np.frombuffer(b"".join(hashes), np.uint64).reshape(-1, 2)
        at = np.minimum(np.searchsorted(self._k, q[:, 0]), n - 1)
        first = self._k[at] == q[:, 0]
        hit = first & (self._r[at] == q[:, 1])
        rows: list[int] = np.where(hit, at, -1).tolist()
        if self._dead:
            for j in np.flatnonzero(hit).tolist():
                if rows[j] in self._dead:
                    rows[j] = -1
        for j in np.flatnonzero(first & ~hit).tolist():  # another hash with that first half: look on
            row = self._row(hashes[j])
            rows[j] = -1 if row is None else row
        return rows

    def known(self, hashes: list[bytes]) -> list[bool]:
        """``[h in self for h in hashes]``, with one vectorised search of the columns."""
        recent = self._recent
        return [row >= 0 or h in recent for h, row in zip(hashes, self._rows(hashes), strict=True)]

    def __setitem__(self, blob_hash: bytes, location: int) -> None:
        """Add or replace (the newest location wins)."""
        self.update([(blob_hash, location)])

    def update(self, items: list[tuple[bytes, int]]) -> None:
        """Add or replace each (hash, location), in order (the newest wins)."""
        recent, dead = self._recent, self._dead
        for (h, v), row in zip(items, self._rows([h for h, _v in items]), strict=True):
            if row >= 0:
                dead.add(row)  # the dict's entry supersedes it
            recent[h] = v
        self._maybe_merge()

    def setdefault(self, blob_hash: bytes, location: int) -> None:
        """Add unless the index has the hash (the first location wins)."""
        self.add_absent([(blob_hash, location)])

    def add_absent(self, items: list[tuple[bytes, int]]) -> None:
        """:meth:`setdefault` of each (hash, location), in order."""
        recent = self._recent
        for (h, v), row in zip(items, self._rows([h for h, _v in items]), strict=True):
            if row < 0 and h not in recent:
                recent[h] = v
        self._maybe_merge()

    def pop(self, blob_hash: bytes) -> None:
        self._recent.pop(blob_hash, None)
        i = self._row(blob_hash)
        if i is not None:
            self._dead.add(i)

    def clear(self) -> None:
        self._recent.clear()
        self._dead.clear()
        self._set_columns(*(np.empty(0, np.uint64) for _ in range(4)))

    def _maybe_merge(self) -> None:
        if len(self._recent) >= max(MERGE_AT, len(self._k) >> 4):
            self.merge()

    def merge(self) -> None:
        """Move the dict's entries into the columns, one column at a time (little memory at once)."""
        cols = [self._k, self._r, self._hi, self._lo]
        self._set_columns(*(np.empty(0, np.uint64) for _ in range(4)))  # cols holds the only references
        if self._dead:
            dead = np.fromiter(self._dead, np.int64, len(self._dead))
            for c in range(4):
                cols[c] = np.delete(cols[c], dead)
            self._dead.clear()
        if self._recent:
            q = np.frombuffer(b"".join(self._recent), np.uint64).reshape(-1, 2)
            locs = list(self._recent.values())
            order = np.argsort(q[:, 0], kind="stable")
            new = [
                q[:, 0],
                q[:, 1],
                np.fromiter((v >> 64 for v in locs), np.uint64, len(locs)),
                np.fromiter((v & _M64 for v in locs), np.uint64, len(locs)),
            ]
            at = np.searchsorted(cols[0], new[0][order])
            for c in range(4):
                cols[c] = np.insert(cols[c], at, new[c][order])
            self._recent.clear()
        self._set_columns(*cols)
