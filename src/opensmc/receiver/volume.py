"""A staging volume: one target disk held on a receiver between runs.

On disk a volume is a directory::

    volume.json     {"version": 1, "size": ..., "chunk_size": ...}, written once
    data.img        sparse file of ``size`` bytes: the disk as received so far
    hashes.osmh     chunk index -> xxh3-128 of every non-zero chunk held
                    (format: ``opensmc.wire.frames.encode_hash_map``)
    dirty           exists while writes may have happened after the last checkpoint

The map is what lets a restarted or incremental run send only what the volume
lacks. Its one rule: it must never claim a chunk whose bytes are not durable.
:meth:`StagingVolume.flush` therefore fsyncs the data *before* it replaces the
map (write to a temporary file, fsync, rename, fsync the directory).

Between checkpoints the on-disk map may be stale in either direction (a chunk
rewritten or punched since). The first write after a checkpoint creates the
``dirty`` marker durably; a volume opened with the marker present (the
receiver died, even by ``kill -9`` or power loss) rebuilds its map from the
bytes actually in ``data.img`` (reading only its allocated extents), so the map
describes the disk exactly and the next run re-sends only what did not land.
Normal writes pay no journal cost for this; the price is one read of the
volume's data after a crash.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from opensmc.wire.frames import Frame, decode_hash_map, digest, encode_hash_map

__all__ = [
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "Misaligned",
    "OutOfRange",
    "StagingVolume",
    "VolumeError",
]

MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 4 * 1024 * 1024
#: Start writeback after this many bytes, so the final fsync is short (PERF_FLOORS.md).
WRITEBACK_EVERY = 32 * 1024 * 1024
_DATA, _MAP, _META, _DIRTY = "data.img", "hashes.osmh", "volume.json", "dirty"
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZEROS = b"\0" * (1024 * 1024)


class VolumeError(Exception):
    """A request the volume refuses; nothing was written. ``code`` is the protocol code."""

    code = "Volume.Error"


class OutOfRange(VolumeError):
    """The frame's range does not lie inside the volume."""

    code = "Frame.OutOfRange"


class Misaligned(VolumeError):
    """The frame does not start and end on chunk boundaries (the end of the volume counts as one)."""

    code = "Frame.Misaligned"


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name, use_errno=True).fallocate
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _Writeback:
    """Starts the writeback of written ranges on a thread of its own, off the write path.

    ``posix_fadvise(DONTNEED)`` on dirty pages starts their writeback now, so the final
    fsync is short (PERF_FLOORS.md); but it submits the I/O (and ext4's block allocation)
    in the calling thread, which measured 0.6 s of a 1.9 s full run spent blocked inside
    ``apply``. Here the writer only posts the range. The previous range, written back by
    the time the next one comes, is dropped a second time: DONTNEED cannot drop dirty
    pages, and dropping them once clean lets the receiver recycle a few MiB of page cache
    instead of filling memory with a copy of the disk (see ``opensmc.agent.reader``).
    Ranges posted while one is in progress merge. Only a hint: errors are ignored.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._cond = threading.Condition()
        self._pending: tuple[int, int] | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def kick(self, lo: int, hi: int) -> None:
        with self._cond:
            if self._closed:
                return
            if self._pending is not None:
                lo, hi = min(lo, self._pending[0]), max(hi, self._pending[1])
            self._pending = (lo, hi)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="opensmc-writeback", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        prev: tuple[int, int] | None = None
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                assert self._pending is not None
                lo, hi = self._pending
                self._pending = None
            try:
                if prev is not None:
                    os.posix_fadvise(self._fd, prev[0], prev[1] - prev[0], os.POSIX_FADV_DONTNEED)
                os.posix_fadvise(self._fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            prev = (lo, hi)

    def close(self) -> None:
        """Stop (dropping any range not started yet); the fd may be closed once this returns."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()


class StagingVolume:
    """A sparse file plus the durable hash map of the chunks it holds. Thread-safe."""

    def __init__(self, directory: Path, size: int, chunk_size: int) -> None:
        # Use create() or open(); this only wires up an existing directory.
        self.directory = directory
        self.size = size
        self.chunk_size = chunk_size
        self.recovered = False
        self._fd = os.open(directory / _DATA, os.O_RDWR)
        self._lock = threading.Lock()
        self._hashes: dict[int, bytes] = {}
        self._dirty = (directory / _DIRTY).exists()
        self._generation = 0  # bumped by every apply; flush() clears the marker only if unchanged
        self._wb_lo, self._wb_hi, self._wb_bytes = size, 0, 0
        self._writeback = _Writeback(self._fd)

    # -- life cycle -----------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | os.PathLike[str], size: int, chunk_size: int = 65536) -> StagingVolume:
        """Make an empty volume of ``size`` bytes in a new directory."""
        d = Path(directory)
        if size <= 0:
            raise ValueError(f"volume size must be > 0, got {size}")
        if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size must be a power of two in 4 KiB..4 MiB, got {chunk_size}")
        d.mkdir(parents=True, exist_ok=False)
        with open(d / _DATA, "wb") as f:
            f.truncate(size)
            os.fsync(f.fileno())
        _atomic_write(d / _MAP, encode_hash_map(chunk_size, {}))
        meta = {"version": 1, "size": size, "chunk_size": chunk_size}
        _atomic_write(d / _META, json.dumps(meta).encode())
        return cls.open(d)

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> StagingVolume:
        """Open a volume; if it was not flushed after its last write, rebuild its map from its data."""
        d = Path(directory)
        meta = json.loads((d / _META).read_text())
        if meta.get("version") != 1:
            raise VolumeError(f"volume format version {meta.get('version')} is not supported")
        vol = cls(d, int(meta["size"]), int(meta["chunk_size"]))
        if vol._dirty:
            vol._rebuild()
        else:
            chunk_size, hashes = decode_hash_map((d / _MAP).read_bytes())
            if chunk_size != vol.chunk_size:
                raise VolumeError(f"hash map chunk size {chunk_size} != volume chunk size {vol.chunk_size}")
            vol._hashes = hashes
        return vol

    def close(self) -> None:
        """Close the data file. Does not flush: an unflushed volume recovers on the next open."""
        self._writeback.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> StagingVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------------------

    def check(self, offset: int, length: int) -> None:
        """Raise :class:`OutOfRange` or :class:`Misaligned` unless the range may be written."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise OutOfRange(f"range {offset}+{length} is outside the volume (size {self.size} bytes); nothing written")
        end = offset + length
        if offset % self.chunk_size or (end % self.chunk_size and end != self.size):
            raise Misaligned(
                f"range {offset}+{length} does not fall on {self.chunk_size}-byte chunk boundaries; nothing written"
            )

    def apply(self, frame: Frame) -> None:
        """Write one verified frame (zero frames punch a hole). Replaying a frame is harmless."""
        self.check(frame.offset, frame.length)
        self._mark_dirty()
        cs = self.chunk_size
        first = frame.offset // cs
        if frame.is_zero:
            self._zero(frame.offset, frame.length)
            with self._lock:
                for i in range(first, first + -(-frame.length // cs)):
                    self._hashes.pop(i, None)
                self._generation += 1
            return
        if frame.length <= cs:
            new = {first: frame.digest}  # one chunk: the frame's verified digest is the chunk's
        else:
            view = memoryview(frame.data)
            new = {first + k: digest(view[p : p + cs]) for k, p in enumerate(range(0, frame.length, cs))}
        _pwrite_all(self._fd, frame.data, frame.offset)
        with self._lock:
            self._hashes.update(new)  # only after the bytes are in the file
            self._generation += 1
            self._wb_lo = min(self._wb_lo, frame.offset)
            self._wb_hi = max(self._wb_hi, frame.end)
            self._wb_bytes += frame.length
            # Counted in bytes written, not span: scattered incremental writes span the whole
            # disk after two frames, and one fadvise per frame would cost more than it saves.
            if self._wb_bytes >= WRITEBACK_EVERY:
                self._writeback.kick(self._wb_lo, self._wb_hi)
                self._wb_lo, self._wb_hi, self._wb_bytes = self.size, 0, 0

    def _zero(self, offset: int, length: int) -> None:
        if _fallocate is not None:
            mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if _fallocate(self._fd, mode, offset, length) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(err, os.strerror(err))
        # No hole punching here (tmpfs-less kernels, some filesystems): write the zeros.
        end = offset + length
        while offset < end:
            n = min(len(_ZEROS), end - offset)
            _pwrite_all(self._fd, memoryview(_ZEROS)[:n], offset)
            offset += n

    def _mark_dirty(self) -> None:
        if self._dirty:
            return
        with self._lock:
            if self._dirty:
                return
            # Durable before the first byte lands, so a crash after it always triggers a rebuild.
            fd = os.open(self.directory / _DIRTY, os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.directory)
            self._dirty = True

    def flush(self) -> None:
        """Checkpoint: fsync the data, then persist the map atomically."""
        with self._lock:
            snapshot = dict(self._hashes)
            generation = self._generation
        # Every entry in the snapshot was added after its pwrite returned, so this fsync covers it.
        os.fsync(self._fd)
        _atomic_write(self.directory / _MAP, encode_hash_map(self.chunk_size, snapshot))
        with self._lock:
            if self._dirty and generation == self._generation:
                (self.directory / _DIRTY).unlink(missing_ok=True)
                _fsync_dir(self.directory)
                self._dirty = False

    def scrub(self) -> list[int]:
        """Re-read every chunk the map holds; forget (and return) those that no longer match.

        A forgotten chunk is simply sent again by the next run, so a staging volume
        damaged on disk heals instead of failing every later run.
        """
        bad: list[int] = []
        for idx, expected in sorted(self.hashes().items()):
            offset = idx * self.chunk_size
            data = self.read(offset, min(self.chunk_size, self.size - offset))
            if digest(data) != expected:
                bad.append(idx)
        if bad:
            # Forgotten chunks must read as zeros like every chunk absent from the map: the
            # next run sends a chunk absent from the map only if it is not zeros at the
            # source, so rot left in place would stay in data.img. Punch them, behind the
            # dirty marker, since the map on disk still claims them until the flush below.
            self._mark_dirty()
            for idx in bad:
                offset = idx * self.chunk_size
                self._zero(offset, min(self.chunk_size, self.size - offset))
            with self._lock:
                for idx in bad:
                    self._hashes.pop(idx, None)
                self._generation += 1
            self.flush()
            # A new volume.json (same content, new inode) tells a receiver that holds this
            # volume open that it changed underneath: it reopens it instead of using (and
            # later flushing back) its stale map.
            meta = (self.directory / _META).read_bytes()
            _atomic_write(self.directory / _META, meta)
        return bad

    # -- reading --------------------------------------------------------------------------------

    def hashes(self) -> dict[int, bytes]:
        """Chunk index -> xxh3-128 of every non-zero chunk held (absent chunks read as zeros)."""
        with self._lock:
            return dict(self._hashes)

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (short only at the end of the volume)."""
        return os.pread(self._fd, length, offset)

    def _rebuild(self) -> None:
        """Make the map describe exactly the bytes in the data file, then checkpoint it."""
        cs = self.chunk_size
        hashes: dict[int, bytes] = {}
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            end = min(os.lseek(self._fd, start, os.SEEK_HOLE), self.size)
            for idx in range(start // cs, -(-end // cs)):
                chunk = os.pread(self._fd, cs, idx * cs)
                usable = len(chunk) - len(chunk) % 8
                nonzero = bool(np.frombuffer(chunk, np.uint8, usable).any()) or any(chunk[usable:])
                if nonzero:
                    hashes[idx] = digest(chunk)
            pos = -(-end // cs) * cs
        self._hashes = hashes
        self._generation += 1
        self.recovered = True
        self.flush()
