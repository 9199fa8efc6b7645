"""Reading a source disk: a byte range of a block device or an image file.

:class:`BlockSource` reads into buffers the caller owns (``readinto``-style),
so a pipeline can recycle a few fixed buffers however large the disk is: new
buffers cost page faults that halve read throughput (PERF_FLOORS.md).
:func:`nonzero_chunks` is the zero map: which chunks of a buffer hold any
non-zero byte, computed by numpy where it is importable, which releases the
GIL; otherwise by comparing each chunk with a chunk of zeros (``bytes ==`` is a
``memcmp``, fast but holding the GIL). Python 3.6 compatible (docs/agent.md).
"""

import os
import stat
from types import TracebackType
from typing import Dict, List

from opensmc.wire import accel

__all__ = ["DROP_BEHIND", "BlockSource", "nonzero_chunks", "source_size"]

_PREADV = hasattr(os, "preadv")
#: Drop the source's pages from the page cache every this many bytes read (see BlockSource).
DROP_BEHIND = 32 * 1024 * 1024


def source_size(path: "str | os.PathLike[str]") -> int:
    """Size in bytes of a regular file or a block device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode) or stat.S_ISREG(os.fstat(fd).st_mode):
            # lseek(SEEK_END) is the portable way to size a block device without ioctls.
            return os.lseek(fd, 0, os.SEEK_END)
        raise ValueError(f"{os.fspath(path)!r} is neither a regular file nor a block device")
    finally:
        os.close(fd)


class BlockSource:
    """``length`` bytes of ``path`` starting at ``offset``, read by position.

    Positions passed to :meth:`read_into` are relative to ``offset``: they are
    the volume offsets the frames carry. The kernel is told the access is
    sequential so it reads ahead aggressively, and the pages behind a
    sequential reader are dropped every ``DROP_BEHIND`` bytes: the bytes are in
    the caller's buffer by then, a full-disk scan should not push the source
    server's working set out of its page cache, and recycling a few MiB of
    just-freed pages instead of taking new ones every time keeps the kernel's
    copy fast. On a VM whose free memory goes back to the host (free page
    reporting) a 2 GiB cold read measured 0.6 s with this and 2.9-3.1 s without
    it, the copy into fresh pages costing the difference.
    """

    def __init__(self, path: "str | os.PathLike[str]", offset: int = 0, length: "int | None" = None) -> None:
        size = source_size(path)
        if length is None:
            length = size - offset
        if offset < 0 or length <= 0 or offset + length > size:
            raise ValueError(f"range {offset}+{length} is outside {os.fspath(path)!r} ({size} bytes)")
        self.path = os.fspath(path)
        self.offset = offset
        self.length = length
        self._fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_SEQUENTIAL)
        # Range-relative: the contiguous reads since _dropped are dropped once DROP_BEHIND long.
        self._dropped = self._next = 0

    def read_into(self, buf: "bytearray | memoryview", pos: int) -> int:
        """Fill ``buf`` from ``pos``; returns the bytes read (fewer only at the end of the range)."""
        view = memoryview(buf)
        want = min(len(view), self.length - pos)
        got = 0
        while got < want:
            n = self._pread(view[got:want], self.offset + pos + got)
            if n == 0:
                raise OSError(f"{self.path}: unexpected end of data at {self.offset + pos + got}")
            got += n
        end = pos + got
        if pos != self._next:
            self._dropped = pos  # a jump: drop only what is read contiguously from here
        self._next = end
        if end - self._dropped >= DROP_BEHIND:
            os.posix_fadvise(self._fd, self.offset + self._dropped, end - self._dropped, os.POSIX_FADV_DONTNEED)
            self._dropped = end
        return got

    def _pread(self, view: memoryview, at: int) -> int:
        if _PREADV:
            return os.preadv(self._fd, [view], at)  # novermin (guarded by _PREADV)
        # Python 3.6 has no os.preadv: seek and readv (the reader is one thread, the fd is ours)
        os.lseek(self._fd, at, os.SEEK_SET)
        return os.readv(self._fd, [view])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "BlockSource":
        return self

    def __exit__(self, t: "type[BaseException] | None", v: "BaseException | None", tb: "TracebackType | None") -> None:
        self.close()


def nonzero_chunks(buf: "bytes | bytearray | memoryview", chunk_size: int) -> "List[bool]":
    """One bool per chunk of ``buf`` (the last may be short): True if it holds a non-zero byte."""
    n = len(buf)
    full = n // chunk_size
    np = accel.numpy
    if np is not None:
        out = np.empty(-(-n // chunk_size), dtype=np.bool_)
        if full:
            words = np.frombuffer(buf, dtype=np.uint64, count=full * chunk_size // 8).reshape(full, chunk_size // 8)
            # A chunk whose first word is not zero holds data (nearly every chunk of data);
            # only the others are read whole, with max(), which unlike any() does not cast
            # every word to a bool first (any() was a fifth of the agent's CPU in a full run).
            head = words[:, 0] != 0
            out[:full] = head
            rest = np.flatnonzero(~head)
            if len(rest):  # by runs of such chunks: slices are views, a fancy index would copy them
                cut = np.flatnonzero(np.diff(rest) != 1)
                starts = [int(rest[0]), *rest[cut + 1].tolist()]
                ends = [*(rest[cut] + 1).tolist(), int(rest[-1]) + 1]
                for a, b in zip(starts, ends):
                    out[a:b] = words[a:b].max(axis=1) != 0
        if full < len(out):
            out[full] = bool(np.frombuffer(buf, dtype=np.uint8, offset=full * chunk_size).any())
        flags: "List[bool]" = out.tolist()
        return flags
    view = memoryview(buf)
    zero = _zeros(chunk_size)
    result = [view[i * chunk_size : (i + 1) * chunk_size].tobytes() != zero for i in range(full)]
    if full * chunk_size < n:
        result.append(view[full * chunk_size :].tobytes().count(0) != n - full * chunk_size)
    return result


_ZEROS: "Dict[int, bytes]" = {}


def _zeros(n: int) -> bytes:
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = bytes(n)
    return z
