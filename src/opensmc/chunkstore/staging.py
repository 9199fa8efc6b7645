"""A staging index: the disk a run is receiving, as chunk index -> blob hash.

The receiver writes incoming chunks into the chunk store (deduplicated) and
records here which blob each chunk of the disk is. There is no second copy of
the disk: sealing an image copies this index into a snapshot.

On disk (a local file, ``<staging dir>/<volume id>.fidx``), little-endian::

    "OSMFIDX\\x01"  8, size 8, chunk size 4, (zero) 44    the 64-byte header
    digest*        16 bytes per chunk: its blob's xxh3-128, all zeros for zeros

The rule that keeps it crash-safe: the file never names a blob that is not
durable in the store. New entries wait in memory (``_pending``, with the
sequence number of the pack that holds their blob) until the store reports
that pack durable, and only then are written into the file. A receiver
killed at any moment leaves a file whose every entry is a blob on stable
storage, old or new; the next run compares hashes and sends the rest.

While entries are pending the index holds the store's ``gc`` lock shared, so
a garbage collection (which reads this file for its roots) cannot run
between a dedup decision and the moment the entry is in the file.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import xxhash

from opensmc.chunkstore.backend import AbstractLock, fsync_dir
from opensmc.chunkstore.repository import GC_LOCK, Repository, StoreError
from opensmc.chunkstore.snapshots import DIGEST, DiskIndex, chunks_of

__all__ = ["StagingError", "StagingIndex"]

MAGIC = b"OSMFIDX\x01"
_HEADER = struct.Struct("<8sQI44x")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 64
_ZERO = bytes(DIGEST)
_PAGE = 4096
T = TypeVar("T")


def _data_pages(words: np.ndarray) -> np.ndarray:
    """(chunks, pages) of uint64 words -> which pages hold a non-zero byte.

    A page whose first word is not zero holds data: that settles nearly every page of
    disk data, and only the others (zero pages, mostly) are read whole. Reading every
    page whole (``np.any``, which also casts each word to a bool) cost the receiver more
    than hashing the same bytes (callgrind, 2026-12-01).
    """
    pages: np.ndarray = words[:, :, 0] != 0
    rest = np.nonzero(~pages)
    if len(rest[0]):
        pages[rest] = words[rest].max(axis=1) != 0
    return pages


class StagingError(ValueError):
    """A write the index refuses (outside the disk, not on chunk boundaries); nothing was written."""

    code = "Volume.Error"


class OutOfRange(StagingError):
    code = "Frame.OutOfRange"


class Misaligned(StagingError):
    code = "Frame.Misaligned"


class StagingIndex:
    def __init__(self, path: Path, size: int, chunk_size: int, digests: np.ndarray) -> None:
        # Use create() or open().
        self.path = path
        self.size = size
        self.chunk_size = chunk_size
        self._digests = digests  # durable state only: what the file says (or will, once written)
        self._fd = os.open(path, os.O_RDWR)
        self._lock = threading.Lock()
        self._pending: list[tuple[int, bytes, int]] = []  # (chunk, digest or zero, pack seq)
        self._view: dict[int, bytes] = {}  # pending entries by chunk, for hashes()
        self._session: AbstractLock | None = None
        self._dropped = 0  # entries dropped because their pack was lost, not yet reported by checkpoint()

    @property
    def chunks(self) -> int:
        return int(self._digests.shape[0])

    # -- life cycle -----------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, chunk_size: int) -> StagingIndex:
        p = Path(path)
        if size <= 0:
            raise ValueError(f"disk size must be > 0, got {size}")
        if chunk_size & (chunk_size - 1) or not 4096 <= chunk_size <= 4 * 1024 * 1024:
            raise ValueError(f"chunk size must be a power of two in 4 KiB..4 MiB, got {chunk_size}")
        tmp = p.with_name(f".{p.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, _HEADER.pack(MAGIC, size, chunk_size))
            os.ftruncate(fd, HEADER_SIZE + chunks_of(size, chunk_size) * DIGEST)  # sparse: all zero chunks
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
        fsync_dir(p.parent)
        return cls.open(p)

    @staticmethod
    def parse_header(raw: bytes) -> tuple[int, int]:
        """(disk size, chunk size) from the first 64 bytes of an index file."""
        if len(raw) < HEADER_SIZE:
            raise StagingError("not a staging index (too short)")
        magic, size, chunk_size = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise StagingError("not a staging index of this format")
        return int(size), int(chunk_size)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> StagingIndex:
        p = Path(path)
        size, chunk_size, digests = cls._read(p)
        return cls(p, size, chunk_size, digests)

    @classmethod
    def _read(cls, p: Path) -> tuple[int, int, np.ndarray]:
        # Straight into the array: reading the file's bytes and copying them out cost the
        # receiver 2 x 16 bytes a chunk at once (16 MiB for an 8 GiB disk) where 1 x is enough.
        with p.open("rb") as f:
            try:
                size, chunk_size = cls.parse_header(f.read(HEADER_SIZE))
            except StagingError as e:
                raise StagingError(f"{p}: {e}") from None
            n = chunks_of(size, chunk_size)
            length = os.fstat(f.fileno()).st_size
            if length != HEADER_SIZE + n * DIGEST:
                raise StagingError(f"{p}: {length} bytes, expected {HEADER_SIZE + n * DIGEST}")
            digests = np.empty((n, DIGEST), np.uint8)
            if f.readinto(digests.data.cast("B")) != n * DIGEST:
                raise StagingError(f"{p}: shorter than {HEADER_SIZE + n * DIGEST} bytes")
        return size, chunk_size, digests

    @staticmethod
    def read_disk(path: str | os.PathLike[str]) -> DiskIndex:
        """The durable content of an index file, without opening it for writing (sealing, gc)."""
        size, chunk_size, digests = StagingIndex._read(Path(path))
        return DiskIndex(size, chunk_size, digests)

    @staticmethod
    def rewrite_without(path: str | os.PathLike[str], chunks: list[int]) -> None:
        """Replace the file by a copy with ``chunks`` cleared (a new file: holders reopen it)."""
        p = Path(path)
        raw = bytearray(p.read_bytes())
        for i in chunks:
            raw[HEADER_SIZE + i * DIGEST : HEADER_SIZE + (i + 1) * DIGEST] = _ZERO
        tmp = p.with_name(f".{p.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
        fsync_dir(p.parent)

    def close(self, *, flush: bool = False, repo: Repository | None = None) -> None:
        """Close the file; with ``flush``, checkpoint first. Unflushed pending entries are dropped."""
        if flush and repo is not None:
            self.checkpoint(repo)
        with self._lock:
            self._pending.clear()
            self._view.clear()
            self._end_session()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- writing --------------------------------------------------------------------------------

    def check(self, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise OutOfRange(f"range {offset}+{length} is outside the disk (size {self.size} bytes); nothing written")
        end = offset + length
        if offset % self.chunk_size or (end % self.chunk_size and end != self.size):
            raise Misaligned(
                f"range {offset}+{length} does not fall on {self.chunk_size}-byte chunk boundaries; nothing written"
            )

    def _begin_session(self, repo: Repository) -> None:
        if self._session is None:
            self._session = repo.backend.lock(GC_LOCK, exclusive=False)
            repo.refresh_after_gc()

    def _end_session(self) -> None:
        if self._session is not None:
            self._session.release()
            self._session = None

    def write(self, repo: Repository, offset: int, data: bytes | memoryview) -> None:
        """Record ``data`` (verified plain bytes) at ``offset``: new chunks go into the store."""
        self.write_many(repo, [(offset, data)])

    def write_many(self, repo: Repository, frames: Sequence[tuple[int, bytes | memoryview]]) -> None:
        """:meth:`write` of each ``(offset, data)`` in order, with one store call and one index update.

        An incremental run sends thousands of one-chunk frames: written one by one, each paid
        the store's lock, index search and ``writev`` and this index's lock on its own, which
        cost the receiver more than the data did. Every range is checked before any is written.
        """
        for offset, data in frames:
            self.check(offset, len(data))
        with self._lock:
            self._begin_session(repo)
        digest = xxhash.xxh3_128_digest
        blobs: list[tuple[bytes, bytes | memoryview, bool]] = []
        # per chunk, in order: its index, and whether it holds data (its blob is the next of `blobs`)
        slots: list[tuple[int, bool]] = []
        for offset, data in frames:
            view = memoryview(data)
            first = offset // self.chunk_size
            nonzero, sparse = self._classify(view)
            for k, (nz, sp) in enumerate(zip(nonzero, sparse, strict=True)):
                slots.append((first + k, nz))
                if nz:
                    c = view[k * self.chunk_size : (k + 1) * self.chunk_size]
                    blobs.append((digest(c), c, sp))
        seqs = iter(zip(blobs, repo.put_many(blobs), strict=True))  # one lock for all of them
        entries: list[tuple[int, bytes, int]] = []
        for idx, nz in slots:
            if nz:
                b, seq = next(seqs)
                entries.append((idx, b[0], seq))
            else:
                entries.append((idx, _ZERO, 0))
        self._add(entries, repo)

    def _classify(self, view: memoryview) -> tuple[list[bool], list[bool]]:
        """Per chunk of a frame: (holds data, has a zero 4 KiB page: worth zstd)."""
        cs = self.chunk_size
        n = -(-len(view) // cs)
        full = len(view) // cs
        if full and cs % _PAGE == 0:
            # One vectorised pass over the frame: which 4 KiB pages hold data, per chunk.
            words = np.frombuffer(view[: full * cs], np.uint64).reshape(full, cs // _PAGE, _PAGE // 8)
            pages = _data_pages(words)
            nonzero: list[bool] = np.any(pages, axis=1).tolist()
            # A chunk with a zero page in it (a sparse file, a partly used block) is worth zstd;
            # one without is almost always incompressible disk data, not worth the CPU.
            sparse: list[bool] = np.logical_not(np.all(pages, axis=1)).tolist()
        else:
            nonzero = [any(view[k * cs : (k + 1) * cs]) for k in range(full)]
            sparse = [True] * full
        if n > full:  # the short last chunk of the disk
            nonzero.append(any(view[full * cs :]))
            sparse.append(True)
        return nonzero, sparse

    def zero(self, repo: Repository, offset: int, length: int) -> None:
        """The range reads as zeros at the source now."""
        self.check(offset, length)
        cs = self.chunk_size
        first = offset // cs
        with self._lock:
            self._begin_session(repo)
        self._add([(i, _ZERO, 0) for i in range(first, first + -(-length // cs))], repo)

    def _add(self, entries: list[tuple[int, bytes, int]], repo: Repository) -> None:
        with self._lock:
            self._pending.extend(entries)
            self._view.update((idx, h) for idx, h, _seq in entries)
            self._apply_locked(repo)

    def _apply_locked(self, repo: Repository) -> None:
        """Write into the file the pending entries whose blobs are durable (in order, a prefix).

        An entry whose pack a writer error lost is dropped: the file keeps what it said before."""
        durable = repo.durable_seq
        lost = repo.lost_ranges()
        k = 0
        done: dict[int, bytes] = {}  # a later entry for a chunk wins
        for idx, h, seq in self._pending:
            if seq and lost and any(a <= seq <= b for a, b in lost):
                self._dropped += 1
                k += 1
                continue
            if seq > durable:
                break
            done[idx] = h
            k += 1
        if not k:
            return
        settled = self._pending[:k]
        del self._pending[:k]
        still = {idx for idx, _h, _s in self._pending}
        for idx, _h, _s in settled:
            if idx not in still:
                self._view.pop(idx, None)
        if done:
            rows = np.fromiter(done, np.int64, len(done))
            self._digests[rows] = np.frombuffer(b"".join(done.values()), np.uint8).reshape(-1, DIGEST)
            lo, hi = int(rows.min()), int(rows.max())
            os.pwrite(self._fd, self._digests[lo : hi + 1].tobytes(), HEADER_SIZE + lo * DIGEST)

    def catch_up(self, repo: Repository) -> None:
        """Write what became durable since the last write (cheap; call it now and then)."""
        with self._lock:
            self._apply_locked(repo)

    def checkpoint(self, repo: Repository) -> None:
        """Make everything written so far durable (store and index), and let gc run again."""
        repo.flush()
        with self._lock:
            self._apply_locked(repo)
            os.fsync(self._fd)
            if not self._pending:
                self._end_session()
            dropped, self._dropped = self._dropped, 0
        if dropped:  # another writer of this store heard the error first; this index must hear it too
            raise StoreError(
                f"{self.path}: {dropped} chunk(s) were in a pack that could not be written to "
                f"{repo.backend.describe()}; they are not recorded (send them again)"
            )

    # -- reading --------------------------------------------------------------------------------

    def hashes(self) -> dict[int, bytes]:
        """Chunk index -> digest of every chunk with data, as the receiver holds it now."""
        with self._lock:
            out = {int(i): bytes(self._digests[i]) for i in np.flatnonzero(self._digests.any(axis=1))}
            for idx, h in self._view.items():
                if h == _ZERO:
                    out.pop(idx, None)
                else:
                    out[idx] = h
        return out

    def held(self) -> int:
        """How many chunks hold data as the receiver holds them now (pending entries included)."""
        with self._lock:
            count = int(np.count_nonzero(self._digests.any(axis=1)))
            for idx, h in self._view.items():
                count += (h != _ZERO) - bool(self._digests[idx].any())
        return count

    def with_current(self, use: Callable[[np.ndarray], T]) -> T:
        """``use(digests)`` of the digests as :meth:`current` gives them, without copying them
        when no entry is pending (the usual case when an agent asks for the map): it runs under
        the index's lock, so ``use`` must not keep the array."""
        with self._lock:
            if not self._view:
                return use(self._digests)
        return use(self.current())

    def current(self) -> np.ndarray:
        """The digests as the receiver holds them now (pending entries included), one row per chunk."""
        with self._lock:
            out = self._digests.copy()
            for idx, h in self._view.items():
                out[idx] = np.frombuffer(h, np.uint8)
        return out

    def disk(self) -> DiskIndex:
        """The durable content, as a snapshot's disk."""
        with self._lock:
            return DiskIndex(self.size, self.chunk_size, self._digests.copy())

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending)
