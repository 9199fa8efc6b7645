"""The chunk store: deduplicated blobs in packs, behind a :class:`~.backend.Backend`.

Objects (the format is ``docs/store-format.md``)::

    config                 {"format": "opensmc-chunkstore", "version": 1, "chunk_size": ..., "hash": "xxh3-128"}
    data/<aa>/<pack>       pack files (``packs.py``)
    index/<pack>           each pack's index, stored again on its own
    snapshots/<image id>   immutable images (``snapshots.py``)
    generation             bumped by every garbage collection

Writing: :meth:`Repository.put` adds a blob to the open pack unless the store
has it; a full pack (``pack_size``) is written by a background thread, so
receiving goes on while the previous pack is made durable. ``put`` returns
the *sequence number* of the pack that holds the blob; once
:attr:`durable_seq` has reached it the blob is on stable storage, and only
then may an index that survives a crash name it (``staging.py`` keeps that
rule). :meth:`flush` writes the open pack and waits for every pack.

Garbage collection (``gc.py``) deletes blobs no snapshot or staging index
names; it takes the ``gc`` lock exclusively, writers and readers hold it
shared (:meth:`session`), and a writer that sees a new ``generation`` reloads
the index, so it never deduplicates against a blob that is gone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from opensmc.chunkstore.backend import AbstractLock, Backend, LocalBackend, ObjectExists, ObjectNotFound
from opensmc.chunkstore.blobindex import BlobIndex
from opensmc.chunkstore.packs import BlobEntry, PackBuilder, PackCorrupt, decode_blob, parse_index
from opensmc.faults import crash_point

__all__ = ["BlobNotFound", "Repository", "StoreError"]

log = logging.getLogger("opensmc.chunkstore")

FORMAT = "opensmc-chunkstore"
VERSION = 1
DEFAULT_CHUNK_SIZE = 16 * 1024
PACK_SIZE = 16 * 1024 * 1024
#: an open pack older than this is written out even if not full: on a slow link a crash
#: must not lose minutes of received data (the staging index can name only durable blobs)
SEAL_AFTER = 2.0
#: packs written but not yet durable, at most (on a backend other than a local directory,
#: one pack buffer each, plus the open one; a local store's packs are files as they fill).
#: One lets the next pack fill while the last is written; two measured no faster on the 2 GiB
#: migration and cost the server 16 MiB more.
PACKS_IN_FLIGHT = 1
GC_LOCK = "gc"


class StoreError(Exception):
    """The store cannot do what was asked; the message says why."""


class BlobNotFound(StoreError):
    """No pack holds that blob."""


@dataclass(frozen=True, slots=True)
class Location:
    pack: str
    entry: BlobEntry


# A location in one int: pack number | offset (32 bits) | stored length (24) | plain length (24) | codec (4).
def _pack_location(number: int, e: BlobEntry) -> int:
    if e.offset >= 1 << 32 or e.stored_length >= 1 << 24 or e.plain_length >= 1 << 24 or e.codec >= 16:
        raise StoreError(f"blob {e.hash.hex()} lies outside what a pack may hold")
    return (((number << 32 | e.offset) << 24 | e.stored_length) << 24 | e.plain_length) << 4 | e.codec


def _unpack_location(names: list[str], blob_hash: bytes, v: int) -> Location:
    codec, v = v & 0xF, v >> 4
    plain, v = v & 0xFFFFFF, v >> 24
    stored, v = v & 0xFFFFFF, v >> 24
    offset, number = v & 0xFFFFFFFF, v >> 32
    return Location(names[number], BlobEntry(blob_hash, codec, offset, plain, stored))


class Repository:
    """One process's view of a chunk store. Thread-safe."""

    def __init__(self, backend: Backend, *, chunk_size: int = DEFAULT_CHUNK_SIZE, pack_size: int = PACK_SIZE) -> None:
        self.backend = backend
        self.pack_size = pack_size
        self.chunk_size = self._config(chunk_size)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # blob hash -> its location packed into one int (see _pack_location), in sorted columns
        # of 32 bytes a blob (blobindex.py; a dict took ~140): what bounds the server's memory
        # on a store of many terabytes.
        self._index = BlobIndex()
        self._pack_names: list[str] = []
        self._pack_numbers: dict[str, int] = {}
        self._loaded: set[str] = set()
        self._generation = self._read_generation()
        # Blobs in the open pack or in packs on their way to the backend: hash -> pack seq.
        self._pending: dict[bytes, int] = {}
        # A local store gets each pack written into its file as it fills (no pack in memory);
        # other backends get packs built in buffers, reused: at most PACKS_IN_FLIGHT + 1 exist.
        self._spools = backend.spool if isinstance(backend, LocalBackend) else None
        self._buffers: list[bytearray] = []
        self._open = self._builder()
        self._opened = 0.0  # monotonic time of the open pack's first blob
        self._seq = 1  # the open pack's sequence number
        self.durable_seq = 0
        self._queue: list[tuple[int, PackBuilder]] = []
        self._writer_error: BaseException | None = None
        # Seqs of packs a writer error lost, as (first, last): they never become durable, even once
        # durable_seq has passed them, and an index waiting on one must drop its entry (staging.py).
        self._lost: list[tuple[int, int]] = []
        self._writer: threading.Thread | None = None
        self.reload()

    # -- config and index -----------------------------------------------------------------------

    def _config(self, chunk_size: int) -> int:
        try:
            doc = json.loads(self.backend.read("config"))
        except ObjectNotFound:
            doc = {"format": FORMAT, "version": VERSION, "chunk_size": chunk_size, "hash": "xxh3-128"}
            try:
                self.backend.write("config", json.dumps(doc).encode(), exclusive=True)
            except ObjectExists:  # another process made it first
                doc = json.loads(self.backend.read("config"))
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise StoreError(
                f"{self.backend.describe()} holds a store of format {doc.get('format')!r} version "
                f"{doc.get('version')!r}; this OpenSMC reads {FORMAT!r} version {VERSION}"
            )
        return int(doc["chunk_size"])

    def _read_generation(self) -> int:
        try:
            return int(self.backend.read("generation"))
        except ObjectNotFound:
            return 0

    def reload(self, *, full: bool = False) -> None:
        """Load the indexes of packs this view has not seen (all of them again with ``full``)."""
        names = [n.removeprefix("index/") for n in self.backend.list("index/")]
        if full:
            with self._lock:
                self._index.clear()
                self._loaded.clear()
                self._pack_names.clear()
                self._pack_numbers.clear()
        for pack in names:
            if pack in self._loaded:
                continue
            try:
                entries = parse_index(self.backend.read(f"index/{pack}"))
            except ObjectNotFound:  # collected meanwhile
                continue
            except PackCorrupt as err:
                log.error("pack index %s is damaged (%s); its blobs are treated as absent", pack, err)
                continue
            with self._lock:
                number = self._number_locked(pack)
                self._index.add_absent([(e.hash, _pack_location(number, e)) for e in entries])
                self._loaded.add(pack)

    def has(self, blob_hash: bytes) -> bool:
        with self._lock:
            return blob_hash in self._index or blob_hash in self._pending

    def blob_count(self) -> int:
        with self._lock:
            return len(self._index)

    def packs(self) -> list[str]:
        return [n.removeprefix("index/") for n in self.backend.list("index/")]

    # -- sessions (the gc lock) -----------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[None]:
        """Hold the store against garbage collection (shared); reload the index if one ran."""
        held: AbstractLock = self.backend.lock(GC_LOCK, exclusive=False)
        try:
            self.refresh_after_gc()
            yield
        finally:
            held.release()

    def refresh_after_gc(self) -> None:
        generation = self._read_generation()
        if generation != self._generation:
            self.reload(full=True)
            self._generation = generation

    # -- writing --------------------------------------------------------------------------------

    def put(self, blob_hash: bytes, plain: bytes | memoryview, *, compress: bool = False) -> int:
        """Store a blob unless the store has it; the seq of the pack that holds it (0: durable already).

        ``blob_hash`` must be the xxh3-128 of ``plain`` (the caller has checked it).
        """
        return self.put_many([(blob_hash, plain, compress)])[0]

    def put_many(self, blobs: Sequence[tuple[bytes, bytes | memoryview, bool]]) -> list[int]:
        """:meth:`put` of each ``(hash, plain, compress)`` in order, under one lock: the seqs."""
        index, pending = self._index, self._pending
        with self._lock:
            self._raise_writer_error()  # (only _seal_locked lets go of the lock, and it checks too)
            known = index.known([b[0] for b in blobs])  # one search of the index for the call
            seqs = [0] * len(blobs)
            new: list[tuple[bytes, bytes | memoryview, bool]] = []  # first copies, to store
            first: dict[bytes, int] = {}  # their positions in `blobs`
            repeats: list[int] = []  # positions of later copies of a blob of `new`
            for i, blob in enumerate(blobs):
                if known[i]:
                    continue
                blob_hash = blob[0]
                seq = pending.get(blob_hash)
                if seq is not None:
                    seqs[i] = seq
                elif blob_hash in first:
                    repeats.append(i)
                else:
                    first[blob_hash] = i
                    new.append(blob)
            now = time.monotonic()
            k = 0
            while k < len(new):
                if not self._open.count:
                    self._opened = now
                seq = self._seq
                took = self._open.add_many(new[k:] if k else new, self.pack_size)
                for blob_hash, _plain, _compress in new[k : k + took]:
                    pending[blob_hash] = seqs[first[blob_hash]] = seq
                k += took
                if len(self._open) >= self.pack_size or now - self._opened >= SEAL_AFTER:
                    self._seal_locked()
            for i in repeats:
                seqs[i] = seqs[first[blobs[i][0]]]
            self._drain_locked()  # before the caller reuses the memory the blobs are in
        return seqs

    def _drain_locked(self) -> None:
        """Write the open pack's new blobs into its file (spooled); a failure loses that pack."""
        try:
            self._open.drain()
        except OSError as err:  # the disk is full: this pack cannot be made durable
            lost = self._seq
            self._lost.append((lost, lost))
            for e in self._open.entries:
                if self._pending.get(e.hash) == lost:
                    del self._pending[e.hash]
            self._open.discard()
            self._open = self._builder()
            self._seq += 1
            log.error("writing a pack to %s failed: %s", self.backend.describe(), err)
            raise StoreError(f"cannot write to the store at {self.backend.describe()}: {err}") from err

    def _builder(self) -> PackBuilder:
        """A builder for the next pack, on a free buffer when there is one (called locked)."""
        if self._spools is not None:
            return PackBuilder(spool=self._spools)
        if self._buffers:
            return PackBuilder(self._buffers.pop())
        # A pack, plus the blob that fills it past pack_size, plus one header: never grows.
        return PackBuilder(capacity=self.pack_size + self.chunk_size + 64)

    def _seal_locked(self) -> None:
        if not self._open.count:
            return
        self._drain_locked()
        while len(self._queue) >= PACKS_IN_FLIGHT and self._writer_error is None:
            self._cond.wait()
        self._raise_writer_error()
        self._queue.append((self._seq, self._open))
        self._open = self._builder()
        self._seq += 1
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._write_packs, name="opensmc-packs", daemon=True)
            self._writer.start()
        self._cond.notify_all()

    def _write_packs(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._writer = None
                    return
                seq, builder = self._queue[0]
            try:
                # The pack first, then its index: an index never names a pack that is not there.
                if builder.spooled:
                    name, index = builder.finish_spooled()
                    builder.commit(f"data/{name[:2]}/{name}")
                else:
                    name, pack, index = builder.finish_parts()
                    self.backend.write(f"data/{name[:2]}/{name}", pack)
                    for part in pack:
                        if isinstance(part, memoryview):
                            part.release()  # so that the buffer can be reused (and resized)
                    del pack
                crash_point("pack.written")
                self.backend.write(f"index/{name}", index)
            except BaseException as err:  # the disk is full, the store is gone: every writer hears it
                with self._lock:
                    self._writer_error = err
                    # This pack, the ones queued behind it and the open one are gone; the next pack
                    # gets a new seq, so no seq means both "lost" and "durable".
                    self._lost.append((seq, self._seq))
                    self._seq += 1
                    for lost in [self._open, *(b for _s, b in self._queue)]:
                        lost.discard()
                    self._open = self._builder()
                    self._queue.clear()
                    self._pending.clear()
                    self._writer = None
                    self._cond.notify_all()
                log.error("writing a pack to %s failed: %s", self.backend.describe(), err)
                return
            with self._lock:
                number = self._number_locked(name)
                # the newest copy wins (see forget)
                self._index.update([(e.hash, _pack_location(number, e)) for e in builder.entries])
                for e in builder.entries:
                    self._pending.pop(e.hash, None)
                self._loaded.add(name)
                self._queue.pop(0)
                if not builder.spooled:
                    self._buffers.append(builder.release())
                self.durable_seq = seq
                self._cond.notify_all()

    def _raise_writer_error(self) -> None:
        if self._writer_error is not None:
            err, self._writer_error = self._writer_error, None
            # What was in flight is lost (see lost()): start over from what is durable.
            raise StoreError(f"cannot write to the store at {self.backend.describe()}: {err}") from err

    def flush(self) -> int:
        """Write the open pack and wait until every pack is durable; returns :attr:`durable_seq`."""
        with self._lock:
            self._seal_locked()
            while self._queue and self._writer_error is None:
                self._cond.wait()
            self._raise_writer_error()
            return self.durable_seq

    def lost_ranges(self) -> list[tuple[int, int]]:
        """(first, last) seqs of packs lost to writer errors (usually none)."""
        if not self._lost:  # the usual answer, without queueing for the lock behind the pack writer
            return []
        with self._lock:
            return list(self._lost)

    def lost(self, seq: int) -> bool:
        """Whether the pack of that seq was lost to a writer error (its blobs are not in the store)."""
        with self._lock:
            return any(first <= seq <= last for first, last in self._lost)

    def wait_durable(self, seq: int, timeout: float | None = None) -> bool:
        with self._lock:
            return self._cond.wait_for(lambda: self.durable_seq >= seq or self._writer_error is not None, timeout)

    # -- reading --------------------------------------------------------------------------------

    def _number_locked(self, pack: str) -> int:
        number = self._pack_numbers.get(pack)
        if number is None:
            number = self._pack_numbers[pack] = len(self._pack_names)
            self._pack_names.append(pack)
        return number

    def locate(self, blob_hash: bytes) -> Location:
        with self._lock:
            packed = self._index.get(blob_hash)
        if packed is None:
            self.reload()  # written by another process since we looked
            with self._lock:
                packed = self._index.get(blob_hash)
        if packed is None:
            raise BlobNotFound(f"no pack in {self.backend.describe()} holds blob {blob_hash.hex()}")
        with self._lock:
            return _unpack_location(self._pack_names, blob_hash, packed)

    def get(self, blob_hash: bytes) -> bytes:
        """A blob's plain bytes, checked against its hash (:class:`~.packs.PackCorrupt` otherwise)."""
        loc = self.locate(blob_hash)
        try:
            stored = self.backend.read(f"data/{loc.pack[:2]}/{loc.pack}", loc.entry.offset, loc.entry.stored_length)
        except ObjectNotFound:
            # A view older than a garbage collection (used outside a session) may name a pack
            # that was repacked: look again with fresh indexes before calling the blob missing.
            self.reload(full=True)
            loc = self.locate(blob_hash)
            try:
                stored = self.backend.read(f"data/{loc.pack[:2]}/{loc.pack}", loc.entry.offset, loc.entry.stored_length)
            except ObjectNotFound:
                raise BlobNotFound(f"pack {loc.pack} holding blob {blob_hash.hex()} is missing") from None
        return decode_blob(loc.entry, stored)

    def forget(self, blob_hash: bytes) -> None:
        """Treat a blob found damaged as absent in this view, so that it is stored again when sent.

        A new copy supersedes the damaged one here; ``gc`` and ``check`` deal with the
        damaged pack itself.
        """
        with self._lock:
            self._index.pop(blob_hash)

    def bump_generation(self) -> int:
        """Tell every process that blobs may be gone (gc calls this under the exclusive lock)."""
        generation = self._read_generation() + 1
        self.backend.write("generation", str(generation).encode())
        return generation
