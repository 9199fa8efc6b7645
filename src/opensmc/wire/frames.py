"""The chunk frame: the unit of data the agent sends and the receiver writes.

A frame is self-describing: it names its own format version, its codec, where
its bytes go and the xxh3-128 digest of the *plain* bytes (hashed before
compression, as borg does, so the check covers the codec too). A request body
is frames laid end to end; nothing else separates them.

Header layout (little-endian, ``HEADER_SIZE`` = 40 bytes)::

    offset  size  field
    0       4     magic           b"OSMF"
    4       1     version         FORMAT_VERSION (1)
    5       1     codec           CODEC_NONE (0) or CODEC_ZSTD (1)
    6       2     flags           bit 0 FLAG_ZERO: the range reads as zeros now
    8       8     offset          byte offset in the volume (u64)
    16      4     plain length    bytes the frame covers once decoded (u32)
    20      4     payload length  bytes that follow the header (u32)
    24      16    digest          xxh3-128 of the plain bytes; all zero for FLAG_ZERO
    40      ...   payload

A zero frame (``FLAG_ZERO``) carries no payload: it tells the receiver that a
range it holds data for is all zeros at the source now, so it must punch (or
zero) it. Its codec must be 0 and its digest all zeros, so that checking it
costs nothing however long the range.

Errors, all raised before anything is written::

    FrameError                      (ValueError)
    ├── BadMagic                    InvalidFrame.BadMagic
    ├── UnsupportedVersion          InvalidFrame.UnsupportedVersion
    ├── UnknownCodec                InvalidFrame.UnknownCodec
    ├── UnknownFlags                InvalidFrame.UnknownFlags
    ├── TruncatedFrame              InvalidFrame.Truncated
    ├── LengthMismatch              InvalidFrame.LengthMismatch
    └── HashMismatch                InvalidFrame.HashMismatch
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import xxhash
import zstandard

__all__ = [
    "CODEC_NONE",
    "CODEC_ZSTD",
    "DIGEST_SIZE",
    "FLAG_ZERO",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_PLAIN",
    "PROBE_SIZE",
    "BadMagic",
    "Frame",
    "FrameError",
    "FrameHeader",
    "HashArray",
    "HashMismatch",
    "LengthMismatch",
    "TruncatedFrame",
    "UnknownCodec",
    "UnknownFlags",
    "UnsupportedVersion",
    "decode_frame",
    "decode_hash_map",
    "decode_payload",
    "digest",
    "encode_frame",
    "encode_hash_array",
    "encode_hash_map",
    "encode_zero_frame",
    "iter_frames",
    "parse_header",
    "zstd_level",
]

MAGIC = b"OSMF"
FORMAT_VERSION = 1
CODEC_NONE = 0
CODEC_ZSTD = 1
FLAG_ZERO = 0x0001
KNOWN_FLAGS = FLAG_ZERO
DIGEST_SIZE = 16
_HEADER = struct.Struct("<4sBBHQII16s")
HEADER_SIZE = _HEADER.size  # 40, see the layout table above
assert HEADER_SIZE == 40
#: Largest plain length a frame may carry. The u32 field allows 4 GiB, but a
#: receiver must be able to hold one frame in memory, so 64 MiB is the limit.
MAX_PLAIN = 64 * 1024 * 1024
#: Compression is tried on this many leading bytes first (see encode_frame).
PROBE_SIZE = 64 * 1024
#: The probe must shrink data below this ratio for the whole frame to be compressed.
PROBE_RATIO = 0.9
_ZERO_DIGEST = b"\0" * DIGEST_SIZE

# compress_level 0-10 (SMC ReplicationParameters) -> zstd level. Index = compress_level.
# 0 is off. Levels 1-2 share zstd 1: on a LAN even zstd 1 (0.6 GB/s) is slower than the
# disk, so the low end must stay cheap; the top end stops at 19 because 20-22 ("ultra")
# need hundreds of MiB of window per stream, which an agent must not take from its server.
_ZSTD_LEVELS = (0, 1, 1, 2, 3, 4, 6, 9, 12, 15, 19)


class FrameError(ValueError):
    """A frame is malformed or corrupt. ``code`` is the protocol error code."""

    code = "InvalidFrame"


class BadMagic(FrameError):
    """The bytes do not start with the frame magic."""

    code = "InvalidFrame.BadMagic"


class UnsupportedVersion(FrameError):
    """The frame names a format version this build does not speak."""

    code = "InvalidFrame.UnsupportedVersion"


class UnknownCodec(FrameError):
    """The frame's codec id is not one this build knows."""

    code = "InvalidFrame.UnknownCodec"


class UnknownFlags(FrameError):
    """The frame sets flag bits this build does not know, or combines them wrongly."""

    code = "InvalidFrame.UnknownFlags"


class TruncatedFrame(FrameError):
    """The input ends inside a header or a payload."""

    code = "InvalidFrame.Truncated"


class LengthMismatch(FrameError):
    """Decoded bytes disagree with the plain length, or a length is out of bounds."""

    code = "InvalidFrame.LengthMismatch"


class HashMismatch(FrameError):
    """The plain bytes do not hash to the frame's digest."""

    code = "InvalidFrame.HashMismatch"


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A parsed, bounds-checked header; the payload has not been read yet."""

    codec: int
    flags: int
    offset: int
    plain_length: int
    payload_length: int
    digest: bytes

    @property
    def is_zero(self) -> bool:
        return bool(self.flags & FLAG_ZERO)


@dataclass(frozen=True, slots=True)
class Frame:
    """A verified frame: ``data`` is the plain bytes (empty for a zero frame).

    For an uncompressed frame ``data`` is the payload the caller passed, not a copy: a view
    of a buffer the caller reuses stays valid only as long as the caller keeps it unchanged.
    """

    offset: int
    length: int
    digest: bytes
    data: bytes | memoryview
    is_zero: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


def digest(data: bytes | memoryview) -> bytes:
    """xxh3-128 of ``data``: the hash frames, chunk maps and images all use."""
    return xxhash.xxh3_128_digest(data)


def zstd_level(compress_level: int) -> int:
    """Map SMC ``compress_level`` 0-10 to a zstd level; 0 means no compression."""
    if not 0 <= compress_level <= 10:
        raise ValueError(f"compress_level must be 0-10, got {compress_level}")
    return _ZSTD_LEVELS[compress_level]


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not safe to share between threads; keep one per thread per level.
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def encode_frame(offset: int, plain: bytes | memoryview, level: int = 0, *, hash_: bytes | None = None) -> bytes:
    """Encode ``plain`` as a frame for ``offset``; ``level`` is a zstd level, 0 = none.

    Compression is decided by a probe: the first ``PROBE_SIZE`` bytes are
    compressed, and the whole frame is compressed only if the probe shrank
    below ``PROBE_RATIO``. Random or already-compressed data (most of a disk
    that is not zeros) thus costs one 64 KiB attempt instead of a full one,
    and a frame is never sent larger than its plain bytes. ``hash_`` lets a
    caller that already hashed ``plain`` skip the second pass.
    """
    n = len(plain)
    if not 0 < n <= MAX_PLAIN:
        raise ValueError(f"plain length must be 1..{MAX_PLAIN}, got {n}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    h = digest(plain) if hash_ is None else hash_
    codec = CODEC_NONE
    payload: bytes | memoryview = plain
    if level > 0:
        cctx = _compressor(level)
        probe = cctx.compress(plain[:PROBE_SIZE])
        if len(probe) < PROBE_RATIO * min(n, PROBE_SIZE):
            packed = probe if n <= PROBE_SIZE else cctx.compress(plain)
            if len(packed) < n:
                codec, payload = CODEC_ZSTD, packed
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, codec, 0, offset, n, len(payload), h)
    return b"".join((header, payload))


def encode_zero_frame(offset: int, length: int) -> bytes:
    """A frame saying ``length`` bytes at ``offset`` are zeros now (no payload)."""
    if not 0 < length <= 0xFFFFFFFF or offset < 0:
        raise ValueError(f"bad zero range offset={offset} length={length}")
    return _HEADER.pack(MAGIC, FORMAT_VERSION, CODEC_NONE, FLAG_ZERO, offset, length, 0, _ZERO_DIGEST)


def parse_header(buf: bytes | memoryview) -> FrameHeader:
    """Parse and bounds-check the first ``HEADER_SIZE`` bytes of ``buf``."""
    if len(buf) < HEADER_SIZE:
        if len(buf) >= 4 and bytes(buf[:4]) != MAGIC:
            raise BadMagic(f"bad frame magic {bytes(buf[:4])!r}, expected {MAGIC!r}")
        raise TruncatedFrame(f"frame header truncated: {len(buf)} of {HEADER_SIZE} bytes")
    magic, version, codec, flags, offset, plain_len, payload_len, h = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise BadMagic(f"bad frame magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"frame format version {version} is not supported (this build speaks version {FORMAT_VERSION})"
        )
    if codec not in (CODEC_NONE, CODEC_ZSTD):
        raise UnknownCodec(f"unknown frame codec id {codec}")
    if flags & ~KNOWN_FLAGS:
        raise UnknownFlags(f"unknown frame flags 0x{flags:04x}")
    if flags & FLAG_ZERO:
        if payload_len != 0 or codec != CODEC_NONE or h != _ZERO_DIGEST or plain_len == 0:
            raise UnknownFlags("a zero frame must have codec 0, no payload, a zero digest and a length")
    elif not 0 < plain_len <= MAX_PLAIN:
        raise LengthMismatch(f"plain length {plain_len} outside 1..{MAX_PLAIN}")
    elif codec == CODEC_NONE and payload_len != plain_len:
        raise LengthMismatch(f"uncompressed frame: payload length {payload_len} != plain length {plain_len}")
    elif payload_len > plain_len:
        raise LengthMismatch(f"compressed payload ({payload_len}) larger than plain length ({plain_len})")
    return FrameHeader(codec, flags, offset, plain_len, payload_len, h)


def _unzstd(payload: bytes | memoryview, plain_length: int) -> bytes:
    """Decompress a zstd payload to at most ``plain_length`` bytes, never allocating more.

    python-zstandard's one-shot ``decompress`` ignores ``max_output_size``
    when the zstd frame declares its content size, and allocates whatever
    the (attacker-written) frame declares: 32 KiB can ask for 1 GiB. So the
    declared size is read first and must equal the frame header's plain
    length; a payload that declares none is decoded through a stream reader,
    which cannot return more than it is asked for.
    """
    try:
        declared = zstandard.frame_content_size(payload)
        if declared == plain_length:
            # The allocation is the declared size, already bounded by MAX_PLAIN in parse_header.
            return _decompressor().decompress(payload, allow_extra_data=False)
        if declared != -1:  # -1: the frame does not say
            raise LengthMismatch(f"zstd payload declares {declared} bytes, the frame header says {plain_length}")
        with _decompressor().stream_reader(payload, read_across_frames=False) as reader:
            data = reader.read(plain_length + 1)
    except zstandard.ZstdError as e:
        raise LengthMismatch(f"zstd payload does not decode to {plain_length} bytes: {e}") from e
    return bytes(data)


def decode_payload(header: FrameHeader, payload: bytes | memoryview) -> Frame:
    """Decompress and verify ``payload`` against ``header``; returns the plain frame."""
    if len(payload) != header.payload_length:
        raise TruncatedFrame(f"frame payload truncated: {len(payload)} of {header.payload_length} bytes")
    if header.is_zero:
        return Frame(header.offset, header.plain_length, header.digest, b"", is_zero=True)
    data: bytes | memoryview
    if header.codec == CODEC_ZSTD:
        data = _unzstd(payload, header.plain_length)
    else:
        data = payload  # not copied: the receiver hands in views of its reused buffers
    if len(data) != header.plain_length:
        raise LengthMismatch(f"payload decodes to {len(data)} bytes, header says {header.plain_length}")
    if digest(data) != header.digest:
        raise HashMismatch(f"frame at offset {header.offset} ({header.plain_length} B) fails its xxh3-128")
    return Frame(header.offset, header.plain_length, header.digest, data)


def decode_frame(buf: bytes | memoryview) -> Frame:
    """Decode exactly one frame; ``buf`` must hold it and nothing more."""
    header = parse_header(buf)
    end = HEADER_SIZE + header.payload_length
    if len(buf) < end:
        raise TruncatedFrame(f"frame payload truncated: {len(buf) - HEADER_SIZE} of {header.payload_length}")
    if len(buf) > end:
        raise LengthMismatch(f"{len(buf) - end} bytes follow the frame's payload")
    return decode_payload(header, bytes(memoryview(buf)[HEADER_SIZE:end]))  # the frame owns its bytes


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        b = stream.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def iter_frames(stream: BinaryIO) -> Iterator[Frame]:
    """Yield the verified frames of a concatenated body until a clean end of stream.

    Raises a :class:`FrameError` at the first bad frame; the frames yielded
    before it were whole and verified.
    """
    while True:
        head = _read_exactly(stream, HEADER_SIZE)
        if not head:
            return
        header = parse_header(head)
        payload = _read_exactly(stream, header.payload_length)
        yield decode_payload(header, payload)


# The chunk-hash map: what a receiver holds, sent by GET .../hashes and kept on disk by the
# staging volume in the same form. Layout (little-endian)::
#
#     offset  size  field
#     0       4     magic        b"OSMH"
#     4       1     version      1
#     5       3     reserved     zero
#     8       4     chunk size   bytes per chunk (u32)
#     12      8     count        number of records (u64)
#     20      24*n  records      chunk index (u64) + xxh3-128 digest (16), ascending index
#
# Chunks absent from the map read as zeros on the receiver.
HASHMAP_MAGIC = b"OSMH"
_HASHMAP_HEADER = struct.Struct("<4sB3xIQ")
_RECORD = struct.Struct("<Q16s")


def encode_hash_map(chunk_size: int, hashes: dict[int, bytes]) -> bytes:
    """Serialise a chunk index -> digest map (see the layout above)."""
    out = bytearray(_HASHMAP_HEADER.pack(HASHMAP_MAGIC, 1, chunk_size, len(hashes)))
    for idx in sorted(hashes):
        out += _RECORD.pack(idx, hashes[idx])
    return bytes(out)


def encode_hash_array(chunk_size: int, digests: np.ndarray) -> bytes:
    """The same encoding from a (chunks, 16) array whose all-zero rows are absent chunks.

    Built with NumPy, without a Python object per chunk: a receiver answers this
    for disks of millions of chunks.
    """
    rows = np.flatnonzero(digests.any(axis=1))
    records = np.empty(len(rows), dtype=np.dtype([("idx", "<u8"), ("digest", "V16")]))
    records["idx"] = rows
    records["digest"] = np.ascontiguousarray(digests[rows]).view("V16").ravel()
    return _HASHMAP_HEADER.pack(HASHMAP_MAGIC, 1, chunk_size, len(rows)) + records.tobytes()


class HashArray(Mapping[int, bytes]):
    """A decoded hash map kept as two arrays (24 bytes a chunk) instead of a dict (~120).

    What an agent holds for a disk of millions of chunks. :meth:`window` gives
    the entries of a range of chunks as a small dict, which is how the
    pipeline looks them up one read buffer at a time.
    """

    def __init__(self, chunk_size: int, indexes: np.ndarray, digests: np.ndarray) -> None:
        self.chunk_size = chunk_size
        self._idx = indexes  # ascending uint64
        self._digests = digests  # (n, 16) uint8

    @classmethod
    def decode(cls, buf: bytes | memoryview) -> HashArray:
        chunk_size, count = _check_hash_map(buf)
        records = np.frombuffer(buf, np.dtype([("idx", "<u8"), ("digest", "V16")]), count, _HASHMAP_HEADER.size)
        idx = np.ascontiguousarray(records["idx"])
        if count and np.any(idx[1:] <= idx[:-1]):
            raise LengthMismatch("hash map records are not in ascending chunk order")
        digests = np.ascontiguousarray(records["digest"]).view(np.uint8).reshape(count, DIGEST_SIZE)
        return cls(chunk_size, idx, digests)

    def window(self, lo: int, hi: int) -> dict[int, bytes]:
        """The entries for chunks ``lo`` (inclusive) to ``hi`` (exclusive)."""
        a, b = np.searchsorted(self._idx, [lo, hi])
        return {int(i): self._digests[k].tobytes() for k, i in enumerate(self._idx[a:b].tolist(), start=int(a))}

    def __getitem__(self, idx: int) -> bytes:
        k = int(np.searchsorted(self._idx, idx))
        if k < len(self._idx) and int(self._idx[k]) == idx:
            return bytes(self._digests[k].tobytes())
        raise KeyError(idx)

    def __iter__(self) -> Iterator[int]:
        return iter(self._idx.tolist())

    def __len__(self) -> int:
        return len(self._idx)


def _check_hash_map(buf: bytes | memoryview) -> tuple[int, int]:
    if len(buf) < _HASHMAP_HEADER.size:
        raise TruncatedFrame("hash map header truncated")
    magic, version, chunk_size, count = _HASHMAP_HEADER.unpack_from(buf)
    if magic != HASHMAP_MAGIC:
        raise BadMagic(f"bad hash map magic {magic!r}")
    if version != 1:
        raise UnsupportedVersion(f"hash map version {version} is not supported (this build speaks 1)")
    if len(buf) != _HASHMAP_HEADER.size + count * _RECORD.size:
        held = len(buf) - _HASHMAP_HEADER.size
        raise LengthMismatch(f"hash map says {count} records but holds {held} bytes")
    return int(chunk_size), int(count)


def decode_hash_map(buf: bytes | memoryview) -> tuple[int, dict[int, bytes]]:
    """Parse a serialised chunk-hash map; returns ``(chunk_size, {index: digest})``."""
    chunk_size, _count = _check_hash_map(buf)
    return chunk_size, {i: h for i, h in _RECORD.iter_unpack(memoryview(buf)[_HASHMAP_HEADER.size :])}
