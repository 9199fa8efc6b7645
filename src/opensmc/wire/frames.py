"""The chunk frame: the unit of data the agent sends and the receiver writes.

A frame is self-describing: it names its own format version, its codec, its
hash, where its bytes go and the digest of the *plain* bytes (hashed before
compression, as borg does, so the check covers the codec too). A request body
is frames laid end to end; nothing else separates them.

Header layout (little-endian, ``HEADER_SIZE`` = 40 bytes)::

    offset  size  field
    0       4     magic           b"OSMF"
    4       1     version         1 or 2 (FORMAT_VERSION)
    5       1     codec           CODEC_NONE (0), CODEC_ZSTD (1) or CODEC_ZLIB (2)
    6       2     version 1: flags (u16), the hash is xxh3-128
                  version 2: hash id (u8): HASH_XXH3 (0) or HASH_BLAKE2B (1), then flags (u8)
    8       8     offset          byte offset in the volume (u64)
    16      4     plain length    bytes the frame covers once decoded (u32)
    20      4     payload length  bytes that follow the header (u32)
    24      16    digest          the plain bytes' digest (the hash named above); all zero for FLAG_ZERO
    40      ...   payload

Flags: bit 0 ``FLAG_ZERO``, the range reads as zeros now. A writer uses
version 1 for an xxh3-128 frame, so that receivers older than version 2 keep
accepting what accelerated agents send, and version 2 for any other hash (an
agent without ``xxhash``). The digest is transport integrity only: the chunk
store addresses chunks by its own hash of the bytes it writes.

A zero frame (``FLAG_ZERO``) carries no payload: it tells the receiver that a
range it holds data for is all zeros at the source now, so it must punch (or
zero) it. Its codec must be 0 and its digest all zeros, so that checking it
costs nothing however long the range.

Errors, all raised before anything is written::

    FrameError                      (ValueError)
    ├── BadMagic                    InvalidFrame.BadMagic
    ├── UnsupportedVersion          InvalidFrame.UnsupportedVersion
    ├── UnknownCodec                InvalidFrame.UnknownCodec
    ├── UnknownHash                 InvalidFrame.UnknownHash
    ├── UnknownFlags                InvalidFrame.UnknownFlags
    ├── TruncatedFrame              InvalidFrame.Truncated
    ├── LengthMismatch              InvalidFrame.LengthMismatch
    └── HashMismatch                InvalidFrame.HashMismatch

This module runs inside the agent, so it is Python 3.6 compatible with the
standard library only (docs/agent.md): annotations are strings, records are
``NamedTuple``, and ``xxhash``/``zstandard``/``numpy`` are optional
(``opensmc.wire.accel``).
"""

import hashlib
import os
import struct
import threading
import zlib
from array import array
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

from opensmc.wire import accel

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "CODEC_NONE",
    "CODEC_ZLIB",
    "CODEC_ZSTD",
    "DEFAULT_CODEC",
    "DEFAULT_HASH",
    "DIGEST_SIZE",
    "FLAG_ZERO",
    "FORMAT_VERSION",
    "HASH_BLAKE2B",
    "HASH_NAMES",
    "HASH_XXH3",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_PLAIN",
    "PROBE_SIZE",
    "BadMagic",
    "Frame",
    "FrameError",
    "FrameHeader",
    "HashArray",
    "HashFile",
    "HashMismatch",
    "LengthMismatch",
    "TruncatedFrame",
    "UnknownCodec",
    "UnknownFlags",
    "UnknownHash",
    "UnsupportedVersion",
    "decode_frame",
    "decode_hash_map",
    "decode_payload",
    "digest",
    "encode_frame",
    "encode_hash_array",
    "encode_hash_map",
    "encode_zero_frame",
    "hash_function",
    "iter_frames",
    "parse_header",
    "zstd_level",
]

MAGIC = b"OSMF"
#: the newest format version this build writes and reads (it reads version 1 too)
FORMAT_VERSION = 2
CODEC_NONE = 0
CODEC_ZSTD = 1
CODEC_ZLIB = 2
KNOWN_CODECS = (CODEC_NONE, CODEC_ZSTD, CODEC_ZLIB)
HASH_XXH3 = 0  #: xxh3-128 (the ``xxhash`` module)
HASH_BLAKE2B = 1  #: BLAKE2b with a 16-byte digest (``hashlib``, standard library)
HASH_NAMES = {HASH_XXH3: "xxh3-128", HASH_BLAKE2B: "blake2b-128"}
FLAG_ZERO = 0x0001
KNOWN_FLAGS = FLAG_ZERO
DIGEST_SIZE = 16
_HEADER_V1 = struct.Struct("<4sBBHQII16s")
_HEADER_V2 = struct.Struct("<4sBBBBQII16s")
HEADER_SIZE = _HEADER_V1.size  # 40, see the layout table above
assert HEADER_SIZE == _HEADER_V2.size == 40
#: Largest plain length a frame may carry. The u32 field allows 4 GiB, but a
#: receiver must be able to hold one frame in memory, so 64 MiB is the limit.
MAX_PLAIN = 64 * 1024 * 1024
#: Compression is tried on this many leading bytes first (see encode_frame).
PROBE_SIZE = 64 * 1024
#: The probe must shrink data below this ratio for the whole frame to be compressed.
PROBE_RATIO = 0.9
_ZERO_DIGEST = b"\0" * DIGEST_SIZE

#: the hash this build sends: xxh3-128 where ``xxhash`` is importable, BLAKE2b-128 otherwise
DEFAULT_HASH = HASH_XXH3 if accel.xxhash is not None else HASH_BLAKE2B
#: the codec this build compresses with: zstd where ``zstandard`` is importable, zlib otherwise
DEFAULT_CODEC = CODEC_ZSTD if accel.zstandard is not None else CODEC_ZLIB

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


class UnknownHash(FrameError):
    """The frame's hash id is not one this build knows (or can compute)."""

    code = "InvalidFrame.UnknownHash"


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


class FrameHeader(NamedTuple):
    """A parsed, bounds-checked header; the payload has not been read yet."""

    codec: int
    flags: int
    offset: int
    plain_length: int
    payload_length: int
    digest: bytes
    hash_id: int = HASH_XXH3

    @property
    def is_zero(self) -> bool:
        return bool(self.flags & FLAG_ZERO)


class Frame(NamedTuple):
    """A verified frame: ``data`` is the plain bytes (empty for a zero frame).

    For an uncompressed frame ``data`` is the payload the caller passed, not a copy: a view
    of a buffer the caller reuses stays valid only as long as the caller keeps it unchanged.
    """

    offset: int
    length: int
    digest: bytes
    data: "bytes | memoryview"
    is_zero: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


def _blake2b(data: "bytes | bytearray | memoryview") -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def hash_function(hash_id: int) -> "Callable[[bytes | bytearray | memoryview], bytes]":
    """The function computing hash ``hash_id`` (16-byte digests); :class:`UnknownHash` if none here."""
    if hash_id == HASH_XXH3:
        xxh = accel.xxhash
        if xxh is None:
            raise UnknownHash("xxh3-128 needs the xxhash module, which this Python does not have")
        fn: "Callable[[bytes | bytearray | memoryview], bytes]" = xxh.xxh3_128_digest
        return fn
    if hash_id == HASH_BLAKE2B:
        return _blake2b
    raise UnknownHash(f"unknown frame hash id {hash_id}")


def digest(data: "bytes | bytearray | memoryview", hash_id: int = HASH_XXH3) -> bytes:
    """The 16-byte digest of ``data``: xxh3-128 unless another ``hash_id`` is named."""
    return hash_function(hash_id)(data)


def zstd_level(compress_level: int) -> int:
    """Map SMC ``compress_level`` 0-10 to a zstd level; 0 means no compression."""
    if not 0 <= compress_level <= 10:
        raise ValueError(f"compress_level must be 0-10, got {compress_level}")
    return _ZSTD_LEVELS[compress_level]


def zlib_level(level: int) -> int:
    """The zlib level standing in for zstd ``level`` where zstandard is missing (0 = none)."""
    if level <= 0:
        return 0
    return 1 if level <= 3 else 6 if level <= 9 else 9


_local = threading.local()


def _compressor(level: int) -> Any:
    # ZstdCompressor objects are not safe to share between threads; keep one per thread per level.
    cache: "Optional[Dict[int, Any]]" = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        zstd = accel.zstandard
        if zstd is None:
            raise UnknownCodec("zstd needs the zstandard module, which this Python does not have")
        cctx = cache[level] = zstd.ZstdCompressor(level=level, write_content_size=True)
    return cctx


def _decompressor() -> Any:
    dctx: Any = getattr(_local, "dctx", None)
    if dctx is None:
        zstd = accel.zstandard
        if zstd is None:
            raise UnknownCodec("this build cannot decode zstd frames: the zstandard module is missing")
        dctx = _local.dctx = zstd.ZstdDecompressor()
    return dctx


def _compress(codec: int, level: int, data: "bytes | memoryview") -> bytes:
    if codec == CODEC_ZSTD:
        return bytes(_compressor(level).compress(data))
    return zlib.compress(data, zlib_level(level))


def encode_frame(
    offset: int,
    plain: "bytes | bytearray | memoryview",
    level: int = 0,
    *,
    hash_: "Optional[bytes]" = None,
    hash_id: int = HASH_XXH3,
    codec: int = CODEC_ZSTD,
) -> bytes:
    """Encode ``plain`` as a frame for ``offset``; ``level`` is a zstd level, 0 = none.

    ``codec`` is the compression used when ``level`` > 0 (zstd, or zlib at
    :func:`zlib_level`); ``hash_id`` names the digest (the agent passes
    :data:`DEFAULT_HASH` and :data:`DEFAULT_CODEC`). Compression is decided by
    a probe: the first ``PROBE_SIZE`` bytes are compressed, and the whole frame
    is compressed only if the probe shrank below ``PROBE_RATIO``. Random or
    already-compressed data (most of a disk that is not zeros) thus costs one
    64 KiB attempt instead of a full one, and a frame is never sent larger
    than its plain bytes. ``hash_`` lets a caller that already hashed
    ``plain`` skip the second pass.
    """
    n = len(plain)
    if not 0 < n <= MAX_PLAIN:
        raise ValueError(f"plain length must be 1..{MAX_PLAIN}, got {n}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if codec not in (CODEC_ZSTD, CODEC_ZLIB):
        raise ValueError(f"frames are compressed with zstd or zlib, not codec {codec}")
    h = digest(plain, hash_id) if hash_ is None else hash_
    used = CODEC_NONE
    payload: "bytes | bytearray | memoryview" = plain
    if level > 0:
        view = memoryview(plain)
        probe = _compress(codec, level, view[:PROBE_SIZE])
        if len(probe) < PROBE_RATIO * min(n, PROBE_SIZE):
            packed = probe if n <= PROBE_SIZE else _compress(codec, level, view)
            if len(packed) < n:
                used, payload = codec, packed
    if hash_id == HASH_XXH3:
        header = _HEADER_V1.pack(MAGIC, 1, used, 0, offset, n, len(payload), h)
    else:
        header = _HEADER_V2.pack(MAGIC, 2, used, hash_id, 0, offset, n, len(payload), h)
    return b"".join((header, payload))


def encode_zero_frame(offset: int, length: int) -> bytes:
    """A frame saying ``length`` bytes at ``offset`` are zeros now (no payload)."""
    if not 0 < length <= 0xFFFFFFFF or offset < 0:
        raise ValueError(f"bad zero range offset={offset} length={length}")
    return _HEADER_V1.pack(MAGIC, 1, CODEC_NONE, FLAG_ZERO, offset, length, 0, _ZERO_DIGEST)


def parse_header(buf: "bytes | bytearray | memoryview") -> FrameHeader:
    """Parse and bounds-check the first ``HEADER_SIZE`` bytes of ``buf``."""
    if len(buf) < HEADER_SIZE:
        if len(buf) >= 4 and bytes(buf[:4]) != MAGIC:
            raise BadMagic(f"bad frame magic {bytes(buf[:4])!r}, expected {MAGIC!r}")
        raise TruncatedFrame(f"frame header truncated: {len(buf)} of {HEADER_SIZE} bytes")
    magic, version, codec, flags, offset, plain_len, payload_len, h = _HEADER_V1.unpack_from(buf)
    if magic != MAGIC:
        raise BadMagic(f"bad frame magic {magic!r}, expected {MAGIC!r}")
    hash_id = HASH_XXH3
    if version == 2:
        hash_id, flags = flags & 0xFF, flags >> 8
        if hash_id not in HASH_NAMES:
            raise UnknownHash(f"unknown frame hash id {hash_id}")
    elif version != 1:
        raise UnsupportedVersion(
            f"frame format version {version} is not supported (this build speaks versions 1 and {FORMAT_VERSION})"
        )
    if codec not in KNOWN_CODECS:
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
    return FrameHeader(codec, flags, offset, plain_len, payload_len, h, hash_id)


def _unzstd(payload: "bytes | memoryview", plain_length: int) -> bytes:
    """Decompress a zstd payload to at most ``plain_length`` bytes, never allocating more.

    python-zstandard's one-shot ``decompress`` ignores ``max_output_size``
    when the zstd frame declares its content size, and allocates whatever
    the (attacker-written) frame declares: 32 KiB can ask for 1 GiB. So the
    declared size is read first and must equal the frame header's plain
    length; a payload that declares none is decoded through a stream reader,
    which cannot return more than it is asked for.
    """
    zstd = accel.zstandard
    if zstd is None:
        raise UnknownCodec("this build cannot decode zstd frames: the zstandard module is missing")
    try:
        declared = zstd.frame_content_size(payload)
        if declared == plain_length:
            # The allocation is the declared size, already bounded by MAX_PLAIN in parse_header.
            return bytes(_decompressor().decompress(payload, allow_extra_data=False))
        if declared != -1:  # -1: the frame does not say
            raise LengthMismatch(f"zstd payload declares {declared} bytes, the frame header says {plain_length}")
        with _decompressor().stream_reader(payload, read_across_frames=False) as reader:
            data = reader.read(plain_length + 1)
    except zstd.ZstdError as e:
        raise LengthMismatch(f"zstd payload does not decode to {plain_length} bytes: {e}") from e
    return bytes(data)


def _unzlib(payload: "bytes | memoryview", plain_length: int) -> bytes:
    """Inflate a zlib payload to at most ``plain_length`` bytes (``max_length`` bounds the allocation)."""
    d = zlib.decompressobj()
    try:
        data = d.decompress(payload, plain_length)
        if not d.eof or d.unconsumed_tail or d.unused_data:
            raise LengthMismatch(f"zlib payload does not decode to exactly {plain_length} bytes")
    except zlib.error as e:
        raise LengthMismatch(f"zlib payload does not decode to {plain_length} bytes: {e}") from e
    return data


def decode_payload(header: FrameHeader, payload: "bytes | memoryview") -> Frame:
    """Decompress and verify ``payload`` against ``header``; returns the plain frame."""
    if len(payload) != header.payload_length:
        raise TruncatedFrame(f"frame payload truncated: {len(payload)} of {header.payload_length} bytes")
    if header.is_zero:
        return Frame(header.offset, header.plain_length, header.digest, b"", is_zero=True)
    data: "bytes | memoryview"
    if header.codec == CODEC_ZSTD:
        data = _unzstd(payload, header.plain_length)
    elif header.codec == CODEC_ZLIB:
        data = _unzlib(payload, header.plain_length)
    else:
        data = payload  # not copied: the receiver hands in views of its reused buffers
    if len(data) != header.plain_length:
        raise LengthMismatch(f"payload decodes to {len(data)} bytes, header says {header.plain_length}")
    if digest(data, header.hash_id) != header.digest:
        name = HASH_NAMES[header.hash_id]
        raise HashMismatch(f"frame at offset {header.offset} ({header.plain_length} B) fails its {name}")
    return Frame(header.offset, header.plain_length, header.digest, data)


def decode_frame(buf: "bytes | bytearray | memoryview") -> Frame:
    """Decode exactly one frame; ``buf`` must hold it and nothing more."""
    header = parse_header(buf)
    end = HEADER_SIZE + header.payload_length
    if len(buf) < end:
        raise TruncatedFrame(f"frame payload truncated: {len(buf) - HEADER_SIZE} of {header.payload_length}")
    if len(buf) > end:
        raise LengthMismatch(f"{len(buf) - end} bytes follow the frame's payload")
    return decode_payload(header, bytes(memoryview(buf)[HEADER_SIZE:end]))  # the frame owns its bytes


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    parts: "List[bytes]" = []
    got = 0
    while got < n:
        b = stream.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def iter_frames(stream: BinaryIO) -> "Iterator[Frame]":
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
#     5       1     hash id      HASH_XXH3 (0) or HASH_BLAKE2B (1): the family of the digests
#     6       2     reserved     zero
#     8       4     chunk size   bytes per chunk (u32)
#     12      8     count        number of records (u64)
#     20      24*n  records      chunk index (u64) + digest (16), ascending index
#
# Chunks absent from the map read as zeros on the receiver. A receiver's map is xxh3-128,
# the chunk store's hash; an agent compares its own hashes with it only when it computes the
# same family (see agent/pipeline.py).
HASHMAP_MAGIC = b"OSMH"
_HASHMAP_HEADER = struct.Struct("<4sBB2xIQ")
_RECORD = struct.Struct("<Q16s")


def encode_hash_map(chunk_size: int, hashes: "Dict[int, bytes]", hash_id: int = HASH_XXH3) -> bytes:
    """Serialise a chunk index -> digest map (see the layout above)."""
    out = bytearray(_HASHMAP_HEADER.pack(HASHMAP_MAGIC, 1, hash_id, chunk_size, len(hashes)))
    for idx in sorted(hashes):
        out += _RECORD.pack(idx, hashes[idx])
    return bytes(out)


def encode_hash_array(chunk_size: int, digests: "np.ndarray", hash_id: int = HASH_XXH3) -> bytearray:
    """The same encoding from a (chunks, 16) array whose all-zero rows are absent chunks.

    Built with NumPy, without a Python object per chunk, straight into the buffer it
    returns: a receiver answers this for disks of millions of chunks. Server side only
    (the receiver has NumPy).
    """
    import numpy as np

    rows = np.flatnonzero(digests.any(axis=1))
    out = bytearray(_HASHMAP_HEADER.size + 24 * len(rows))
    _HASHMAP_HEADER.pack_into(out, 0, HASHMAP_MAGIC, 1, hash_id, chunk_size, len(rows))
    records = np.frombuffer(out, np.dtype([("idx", "<u8"), ("digest", "V16")]), offset=_HASHMAP_HEADER.size)
    records["idx"] = rows
    records["digest"] = np.ascontiguousarray(digests[rows]).view("V16").ravel()
    return out


class HashArray(Mapping[int, bytes]):
    """A decoded hash map kept as two flat arrays (24 bytes a chunk) instead of a dict (~120).

    What an agent holds for a disk of millions of chunks. :meth:`window` gives
    the entries of a range of chunks as a small dict, which is how the
    pipeline looks them up one read buffer at a time. ``hash_id`` is the
    family of the digests. Standard library only; NumPy, where importable,
    only speeds up :meth:`decode`.
    """

    def __init__(self, chunk_size: int, indexes: "array[int]", digests: bytes, hash_id: int = HASH_XXH3) -> None:
        self.chunk_size = chunk_size
        self.hash_id = hash_id
        self._idx = indexes  # ascending, typecode "Q"
        self._digests = digests  # DIGEST_SIZE bytes per entry, in the order of _idx

    @classmethod
    def decode(cls, buf: "bytes | memoryview") -> "HashArray":
        chunk_size, count, hash_id = _check_hash_map(buf)
        body = memoryview(buf)[_HASHMAP_HEADER.size :]
        np = accel.numpy
        idx = array("Q")
        if np is not None:
            records = np.frombuffer(body, np.dtype([("idx", "<u8"), ("digest", "V16")]), count)
            idx.frombytes(np.ascontiguousarray(records["idx"]).astype("=u8").tobytes())
            digests = bytes(np.ascontiguousarray(records["digest"]).tobytes())
        else:
            pairs = list(_RECORD.iter_unpack(body))
            idx.extend(i for i, _h in pairs)
            digests = b"".join(h for _i, h in pairs)
        if any(a >= b for a, b in zip(idx, idx[1:])):
            raise LengthMismatch("hash map records are not in ascending chunk order")
        return cls(chunk_size, idx, digests, hash_id)

    def window(self, lo: int, hi: int) -> "Dict[int, bytes]":
        """The entries for chunks ``lo`` (inclusive) to ``hi`` (exclusive)."""
        a, b = bisect_left(self._idx, lo), bisect_left(self._idx, hi)
        d = self._digests
        return {self._idx[k]: d[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE] for k in range(a, b)}

    def __getitem__(self, idx: int) -> bytes:
        k = bisect_left(self._idx, idx)
        if k < len(self._idx) and self._idx[k] == idx:
            return self._digests[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE]
        raise KeyError(idx)

    def __iter__(self) -> "Iterator[int]":
        return iter(self._idx)

    def __len__(self) -> int:
        return len(self._idx)


class HashFile(Mapping[int, bytes]):
    """A hash map spooled to a file and searched there with ``os.pread``: memory O(1) whatever its size.

    What an agent holds the receiver's map as (agent/uploader.py): a 1 TiB
    disk full of data at 16 KiB chunks is a 1.5 GiB map, which must not be in
    the agent's memory. :meth:`window` (one call per read buffer) is a binary
    search over the fixed 24-byte records and one read of the window's.
    """

    def __init__(self, spool: BinaryIO, chunk_size: int, count: int, hash_id: int) -> None:
        self.chunk_size = chunk_size
        self.hash_id = hash_id
        self._f = spool
        self._fd = spool.fileno()
        self._count = count

    @classmethod
    def receive(cls, stream: BinaryIO, spool: BinaryIO, piece: int = 43690) -> "HashFile":
        """Read an encoded map from ``stream`` into ``spool`` (a temporary file), checking it on the way."""
        head = _read_exactly(stream, _HASHMAP_HEADER.size)
        if len(head) < _HASHMAP_HEADER.size:
            raise TruncatedFrame("hash map header truncated")
        magic, version, hash_id, chunk_size, count = _HASHMAP_HEADER.unpack(head)
        if magic != HASHMAP_MAGIC:
            raise BadMagic(f"bad hash map magic {magic!r}")
        if version != 1:
            raise UnsupportedVersion(f"hash map version {version} is not supported (this build speaks 1)")
        if hash_id not in HASH_NAMES:
            raise UnknownHash(f"unknown hash map hash id {hash_id}")
        spool.write(head)
        left, last = count, -1
        while left:
            n = min(left, piece)
            block = _read_exactly(stream, n * _RECORD.size)
            if len(block) != n * _RECORD.size:
                raise LengthMismatch(f"hash map says {count} records but ends after {count - left + len(block) // 24}")
            idx = _indexes(block)
            if idx[0] <= last or any(a >= b for a, b in zip(idx, idx[1:])):
                raise LengthMismatch("hash map records are not in ascending chunk order")
            last = idx[-1]
            spool.write(block)
            left -= n
        if stream.read(1):
            raise LengthMismatch(f"hash map holds more than its {count} records")
        spool.flush()
        return cls(spool, int(chunk_size), int(count), int(hash_id))

    @classmethod
    def open(cls, f: BinaryIO) -> "HashFile":
        """A map this agent spooled before (``write_to``): the header and the size are checked."""
        head = os.pread(f.fileno(), _HASHMAP_HEADER.size, 0)
        if len(head) < _HASHMAP_HEADER.size:
            raise TruncatedFrame("hash map header truncated")
        magic, version, hash_id, chunk_size, count = _HASHMAP_HEADER.unpack(head)
        if magic != HASHMAP_MAGIC or version != 1 or hash_id not in HASH_NAMES:
            raise BadMagic("not a hash map this build wrote")
        if os.fstat(f.fileno()).st_size != _HASHMAP_HEADER.size + count * _RECORD.size:
            raise LengthMismatch(f"hash map says {count} records but its file is another size")
        return cls(f, int(chunk_size), int(count), int(hash_id))

    def write_to(self, out: BinaryIO) -> None:
        """Copy the encoded map to ``out``."""
        pos, end = 0, _HASHMAP_HEADER.size + self._count * _RECORD.size
        while pos < end:
            block = os.pread(self._fd, min(1 << 20, end - pos), pos)
            if not block:
                raise TruncatedFrame("hash map spool file shrank")
            out.write(block)
            pos += len(block)

    def close(self) -> None:
        self._f.close()

    def _record(self, k: int, n: int = 1) -> bytes:
        return os.pread(self._fd, n * _RECORD.size, _HASHMAP_HEADER.size + k * _RECORD.size)

    def _bisect(self, idx: int) -> int:
        lo, hi = 0, self._count
        while lo < hi:
            mid = (lo + hi) // 2
            if _RECORD.unpack(self._record(mid))[0] < idx:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def window(self, lo: int, hi: int) -> "Dict[int, bytes]":
        """The entries for chunks ``lo`` (inclusive) to ``hi`` (exclusive)."""
        a = self._bisect(lo)
        b = self._bisect(hi)
        return dict(_RECORD.iter_unpack(self._record(a, b - a))) if b > a else {}

    def __getitem__(self, idx: int) -> bytes:
        k = self._bisect(idx)
        if k < self._count:
            i, h = _RECORD.unpack(self._record(k))
            if i == idx:
                return bytes(h)
        raise KeyError(idx)

    def __iter__(self) -> "Iterator[int]":
        for k in range(0, self._count, 43690):
            for i, _h in _RECORD.iter_unpack(self._record(k, min(43690, self._count - k))):
                yield i

    def __len__(self) -> int:
        return self._count


def _indexes(block: bytes) -> "List[int]":
    """The chunk indexes of a run of 24-byte records."""
    np = accel.numpy
    if np is not None:
        idx: "List[int]" = np.frombuffer(block, np.dtype([("idx", "<u8"), ("digest", "V16")]))["idx"].tolist()
        return idx
    return [i for i, _h in _RECORD.iter_unpack(block)]


def _check_hash_map(buf: "bytes | memoryview") -> "Tuple[int, int, int]":
    if len(buf) < _HASHMAP_HEADER.size:
        raise TruncatedFrame("hash map header truncated")
    magic, version, hash_id, chunk_size, count = _HASHMAP_HEADER.unpack_from(buf)
    if magic != HASHMAP_MAGIC:
        raise BadMagic(f"bad hash map magic {magic!r}")
    if version != 1:
        raise UnsupportedVersion(f"hash map version {version} is not supported (this build speaks 1)")
    if hash_id not in HASH_NAMES:
        raise UnknownHash(f"unknown hash map hash id {hash_id}")
    if len(buf) != _HASHMAP_HEADER.size + count * _RECORD.size:
        held = len(buf) - _HASHMAP_HEADER.size
        raise LengthMismatch(f"hash map says {count} records but holds {held} bytes")
    return int(chunk_size), int(count), int(hash_id)


def decode_hash_map(buf: "bytes | memoryview") -> "Tuple[int, Dict[int, bytes]]":
    """Parse a serialised chunk-hash map; returns ``(chunk_size, {index: digest})``."""
    chunk_size, _count, _hash_id = _check_hash_map(buf)
    return chunk_size, {i: h for i, h in _RECORD.iter_unpack(memoryview(buf)[_HASHMAP_HEADER.size :])}
