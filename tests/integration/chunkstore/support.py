"""Helpers for the chunk store tests."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

import xxhash

from opensmc.chunkstore.backend import LocalBackend, LocalSpool

CHUNK = 16 * 1024
#: four 16 KiB blobs fill a pack: 8 + 4 * (28 + 16384) >= 65536
PACK4 = 4 * CHUNK


def h(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)


def blob(n: int, size: int = CHUNK) -> bytes:
    """Distinct, incompressible-looking content for each ``n``."""
    seed = n.to_bytes(8, "little")
    out = bytearray()
    i = 0
    while len(out) < size:
        out += xxhash.xxh3_128_digest(seed + i.to_bytes(8, "little"))
        i += 1
    return bytes(out[:size])


class FailingBackend(LocalBackend):
    """A LocalBackend whose writes of names under ``fail_prefix`` raise ENOSPC while ``full`` is set.

    A pack written through a spool fails when it is committed (as a pack written whole fails),
    or, with ``full_on_append``, already when its blobs are appended to the file.
    """

    def __init__(self, root: str | os.PathLike[str], fail_prefix: str = "data/") -> None:
        super().__init__(root)
        self.full = False
        self.full_on_append = False
        self.fail_prefix = fail_prefix
        self.writes: list[str] = []

    def spool(self) -> LocalSpool:
        return _FailingSpool(self, super().spool())

    def write(self, name: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False) -> None:
        if self.full and name.startswith(self.fail_prefix):
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write(name, data, exclusive=exclusive)
        self.writes.append(name)


class _FailingSpool(LocalSpool):
    def __init__(self, backend: FailingBackend, inner: LocalSpool) -> None:
        self.__dict__.update(inner.__dict__)
        self._failing = backend

    def append(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        if self._failing.full_on_append:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().append(parts)

    def commit(self, name: str) -> None:
        if self._failing.full and name.startswith(self._failing.fail_prefix):
            raise OSError(errno.ENOSPC, "No space left on device")
        super().commit(name)
        self._failing.writes.append(name)
