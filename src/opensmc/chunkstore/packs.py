"""Pack files: many blobs in one object, self-describing, every blob hashed.

A blob is one chunk of a disk, named by the xxh3-128 of its plain bytes.
About a thousand share a pack (16 MiB), so a terabyte is tens of
thousands of objects, not hundreds of millions of files. Layout, little-endian::

    "OSMPACK\\x01"                          8 bytes: magic and format version 1
    blob*   header  hash        16          xxh3-128 of the plain bytes
                    codec        1          0 stored plain, 1 zstd
                    (zero)       3
                    plain len    4
                    stored len   4          bytes of data that follow
            data    stored len bytes
    index   entry*  hash 16, codec 1, (zero) 3, offset 8 (of the data), plain len 4, stored len 4
    footer  count 4, xxh3-128 of the index entries 16, "OSMPIDX\\x01" 8

The pack's name is the xxh3-128 of all its bytes. The index part (entries and
footer) is also stored on its own as ``index/<pack name>``, so that opening
a store reads indexes, not packs; ``check`` rebuilds and compares both.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import xxhash
import zstandard

__all__ = [
    "CODEC_NONE",
    "CODEC_ZSTD",
    "PACK_MAGIC",
    "BlobEntry",
    "PackBuilder",
    "PackCorrupt",
    "Spool",
    "decode_blob",
    "parse_index",
    "parse_pack",
]

PACK_MAGIC = b"OSMPACK\x01"
INDEX_MAGIC = b"OSMPIDX\x01"
CODEC_NONE = 0
CODEC_ZSTD = 1
_BLOB = struct.Struct("<16sB3xII")
_ENTRY = struct.Struct("<16sB3xQII")
_FOOTER = struct.Struct("<I16s8s")


class PackCorrupt(ValueError):
    """A pack or index does not parse or does not match its hashes."""


class BlobEntry(NamedTuple):
    """Where a blob lies in its pack (one per blob: a named tuple, which costs a third of a
    frozen dataclass to make, and a store makes one for every 16 KiB it receives)."""

    hash: bytes
    codec: int
    offset: int  #: of the blob's data in the pack
    plain_length: int
    stored_length: int


class Spool(Protocol):
    """Where a pack is written as it fills (``LocalSpool``): append, then commit under its name."""

    def append(self, parts: Sequence[bytes | bytearray | memoryview]) -> None: ...

    def commit(self, name: str) -> None: ...

    def discard(self) -> None: ...


def _zstd_compressor() -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=1)


class PackBuilder:
    """Collects blobs until :meth:`finish_parts` gives the pack's bytes and index.

    Two ways to hold the pack while it fills:

    * in one buffer, which can be handed in and taken back (:meth:`release`), so
      a writer reuses a few buffers for every pack it makes: a pack built by
      appending to a new ``bytearray`` was reallocated, and every byte copied,
      about eight times as it grew, and each new buffer costs page faults on
      fresh memory. A blob past the buffer's end grows it (rare: it is sized for
      a pack and one chunk);
    * in a file (``spool``, a factory of :class:`Spool`: the local backend's): each
      blob is written out by :meth:`drain`, which the caller runs before it reuses
      the memory the blobs were given in, so the pack costs no memory at all and
      its bytes are copied once, into the page cache. :meth:`finish_spooled`
      writes the index; the caller commits the spool under the pack's name.
    """

    def __init__(
        self, buffer: bytearray | None = None, capacity: int = 0, *, spool: Callable[[], Spool] | None = None
    ) -> None:
        self._new_spool = spool
        self._spool: Spool | None = None
        self._parts: list[bytes | memoryview] = []  # written out by drain() (spooled)
        if spool is None:
            self._buf = buffer if buffer is not None else bytearray(capacity or len(PACK_MAGIC))
            self._buf[: len(PACK_MAGIC)] = PACK_MAGIC
        else:
            self._buf = bytearray()
            self._parts.append(PACK_MAGIC)
        self._size = len(PACK_MAGIC)
        self._hash = xxhash.xxh3_128(PACK_MAGIC)
        self.entries: list[BlobEntry] = []
        self._zstd: zstandard.ZstdCompressor | None = None

    def __len__(self) -> int:
        return self._size

    @property
    def count(self) -> int:
        return len(self.entries)

    @property
    def spooled(self) -> bool:
        return self._new_spool is not None

    def add(self, blob_hash: bytes, plain: bytes | memoryview, *, compress: bool = False) -> None:
        """Append a blob (its hash already checked by the caller). ``compress``: try zstd-1, keep it if smaller.

        Spooled, ``plain`` is only referred to until the next :meth:`drain`."""
        self.add_many([(blob_hash, plain, compress)], 0)

    def add_many(self, blobs: Sequence[tuple[bytes, bytes | memoryview, bool]], limit: int) -> int:
        """:meth:`add` of each ``(hash, plain, compress)`` in order until the pack reaches ``limit``
        bytes (0: no limit); returns how many were added (at least one, the one that reached it).

        One call per frame of blobs, with what each blob needs bound to locals: the store
        does this for every 16 KiB it receives, and per-blob method calls and attribute
        lookups were most of the receiver's CPU after the copies."""
        pack_header, blob_size = _BLOB.pack, _BLOB.size
        update, append = self._hash.update, self.entries.append
        spooled = self._new_spool is not None
        parts, buf = self._parts, self._buf
        size = self._size
        added = 0
        for blob_hash, plain, compress in blobs:
            n = len(plain)
            data: bytes | memoryview = plain
            codec = CODEC_NONE
            if compress:
                if self._zstd is None:
                    self._zstd = _zstd_compressor()
                packed = self._zstd.compress(plain)
                if len(packed) < n * 0.9:
                    data, codec = packed, CODEC_ZSTD
            stored = len(data)
            header = pack_header(blob_hash, codec, n, stored)
            offset = size + blob_size
            end = offset + stored
            if spooled:
                parts += (header, data)
            else:
                if end > len(buf):
                    buf.extend(bytes(end - len(buf)))
                buf[size:offset] = header
                buf[offset:end] = data
            update(header)
            update(data)
            append(BlobEntry(blob_hash, codec, offset, n, stored))
            size = end
            added += 1
            if limit and size >= limit:
                break
        self._size = size
        return added

    def drain(self) -> None:
        """Spooled: write the blobs added since the last drain into the spool (one ``writev``)."""
        if not self.entries or not self._parts or self._new_spool is None:
            return  # (no file for a pack without blobs)
        if self._spool is None:
            self._spool = self._new_spool()
        parts, self._parts = self._parts, []
        self._spool.append(parts)

    def finish_spooled(self) -> tuple[str, bytes]:
        """Spooled: write what is left and the index; (pack name, index bytes). Then :meth:`commit`."""
        index = encode_index(self.entries)
        self._hash.update(index)
        self._parts.append(index)
        self.drain()
        return self._hash.hexdigest(), index

    def commit(self, name: str) -> None:
        """Spooled: make the pack durable as ``name`` (after :meth:`finish_spooled`)."""
        assert self._spool is not None
        self._spool.commit(name)  # on failure it is still ours: discard() removes the file
        self._spool = None

    def discard(self) -> None:
        """Spooled: drop the pack's file (a lost pack); harmless otherwise, and twice."""
        self._parts = []
        if self._spool is not None:
            spool, self._spool = self._spool, None
            spool.discard()

    def finish_parts(self) -> tuple[str, list[bytes | memoryview], bytes]:
        """(pack name, the pack's bytes as parts in order, index bytes), for ``Backend.write``.

        The first part is a view of the builder's buffer: write it before :meth:`release`."""
        index = encode_index(self.entries)
        self._hash.update(index)
        return self._hash.hexdigest(), [memoryview(self._buf)[: self._size], index], index

    def finish(self) -> tuple[str, bytes, bytes]:
        """(pack name, pack bytes, index bytes): :meth:`finish_parts` joined."""
        name, parts, index = self.finish_parts()
        return name, b"".join(parts), index

    def release(self) -> bytearray:
        """The buffer, for the next builder (no view of it may be left)."""
        buf, self._buf = self._buf, bytearray()
        return buf


def encode_index(entries: list[BlobEntry]) -> bytes:
    body = b"".join(_ENTRY.pack(e.hash, e.codec, e.offset, e.plain_length, e.stored_length) for e in entries)
    return body + _FOOTER.pack(len(entries), xxhash.xxh3_128_digest(body), INDEX_MAGIC)


def parse_index(raw: bytes) -> list[BlobEntry]:
    """The entries of an index (a pack's tail, or its ``index/`` object); :class:`PackCorrupt` if damaged."""
    if len(raw) < _FOOTER.size:
        raise PackCorrupt("index too short")
    count, digest, magic = _FOOTER.unpack_from(raw, len(raw) - _FOOTER.size)
    if magic != INDEX_MAGIC:
        raise PackCorrupt("index magic missing (not a pack index, or a newer format)")
    size = count * _ENTRY.size
    if size + _FOOTER.size > len(raw):
        raise PackCorrupt(f"index claims {count} entries, more than it holds")
    body = raw[len(raw) - _FOOTER.size - size : len(raw) - _FOOTER.size]
    if xxhash.xxh3_128_digest(body) != digest:
        raise PackCorrupt("index does not match its hash")
    return [BlobEntry(*fields) for fields in _ENTRY.iter_unpack(body)]


def parse_pack(raw: bytes, name: str | None = None) -> list[BlobEntry]:
    """Check a whole pack (name, magic, index, every blob header) and return its entries."""
    if not raw.startswith(PACK_MAGIC):
        raise PackCorrupt("pack magic missing (not a pack, or a newer format)")
    if name is not None and xxhash.xxh3_128_hexdigest(raw) != name.rpartition("/")[2]:
        raise PackCorrupt(f"pack {name} does not match its name")
    entries = parse_index(raw)
    for e in entries:
        start = e.offset - _BLOB.size
        if start < len(PACK_MAGIC) or e.offset + e.stored_length > len(raw):
            raise PackCorrupt(f"blob {e.hash.hex()} lies outside the pack")
        header = _BLOB.unpack_from(raw, start)
        if header != (e.hash, e.codec, e.plain_length, e.stored_length):
            raise PackCorrupt(f"blob {e.hash.hex()}: header and index disagree")
    return entries


_dctx = zstandard.ZstdDecompressor()


def decode_blob(entry: BlobEntry, stored: bytes) -> bytes:
    """The plain bytes of a blob, checked against its hash (:class:`PackCorrupt` otherwise)."""
    if len(stored) != entry.stored_length:
        raise PackCorrupt(f"blob {entry.hash.hex()}: {len(stored)} bytes read, {entry.stored_length} expected")
    if entry.codec == CODEC_ZSTD:
        try:
            # python-zstandard trusts a frame's declared content size over max_output_size:
            # check it first, so a damaged blob cannot make us allocate more than it covers.
            declared = zstandard.frame_content_size(stored)
            if declared > entry.plain_length:
                raise PackCorrupt(f"blob {entry.hash.hex()}: declares {declared} bytes, {entry.plain_length} expected")
            plain = _dctx.decompress(stored, max_output_size=entry.plain_length)
        except zstandard.ZstdError as e:
            raise PackCorrupt(f"blob {entry.hash.hex()}: {e}") from None
    elif entry.codec == CODEC_NONE:
        plain = stored
    else:
        raise PackCorrupt(f"blob {entry.hash.hex()}: unknown codec {entry.codec}")
    if len(plain) != entry.plain_length or xxhash.xxh3_128_digest(plain) != entry.hash:
        raise PackCorrupt(f"blob {entry.hash.hex()} does not match its hash")
    return plain
