"""The storage backend contract: named, immutable-once-written objects.

Everything the chunk store keeps (packs, their indexes, snapshots, config)
is an object with a ``/``-separated name. A backend only has to read, write,
list and delete whole objects (and read a byte range of one), which any
object store offers; :class:`LocalBackend` keeps them as files in a
directory. ``tests/conformance`` holds the suite every backend must pass.

Locks are part of the contract because garbage collection must exclude
writers: a *shared* lock for writers and readers, an *exclusive* one for
the collector. A lock dies with the process that holds it.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import socket
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeAlias

__all__ = [
    "AbstractLock",
    "Backend",
    "Data",
    "LocalBackend",
    "LocalSpool",
    "LockBusy",
    "ObjectExists",
    "ObjectNotFound",
    "check_name",
    "joined",
    "locked",
]

Buffer: TypeAlias = bytes | bytearray | memoryview
#: What ``write`` takes: one buffer, or the parts of the object in order (a pack is its blobs
#: as received: a local backend writes them with one ``writev``, never joining them).
Data: TypeAlias = Buffer | Sequence[Buffer]


def _parts(data: Data) -> Sequence[Buffer]:
    return (data,) if isinstance(data, bytes | bytearray | memoryview) else data


def joined(data: Data) -> bytes:
    """``data`` as one ``bytes`` (for clients that want a single body)."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    return b"".join(data)


class ObjectNotFound(KeyError):
    """No object of that name."""


class ObjectExists(FileExistsError):
    """``write(..., exclusive=True)`` of a name that exists already."""


class LockBusy(BlockingIOError):
    """A non-blocking lock request found the lock held."""


def check_name(name: str) -> str:
    """Object names: relative, ``/``-separated, no empty, ``.`` or ``..`` parts, no leading dot."""
    parts = name.split("/")
    if not name or any(not p or p in (".", "..") or p.startswith(".") for p in parts) or "\0" in name:
        raise ValueError(f"bad object name {name!r}")
    return name


class Backend(Protocol):
    def write(self, name: str, data: Data, *, exclusive: bool = False) -> None:
        """Store ``data`` under ``name``, durably and atomically (readers see all of it or none).

        ``data`` is one buffer, or a sequence of them: the object's parts, in order.

        With ``exclusive`` an existing object is never replaced: :class:`ObjectExists`.
        """
        ...

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes (``length`` from ``offset``; to the end when None). :class:`ObjectNotFound`."""
        ...

    def size(self, name: str) -> int: ...

    def exists(self, name: str) -> bool: ...

    def list(self, prefix: str) -> list[str]:
        """Names of the objects whose name starts with ``prefix`` (a folder ends in ``/``), sorted."""
        ...

    def delete(self, name: str) -> None:
        """Remove an object; removing one that is gone is not an error."""
        ...

    def lock(self, name: str, *, exclusive: bool, blocking: bool = True) -> AbstractLock:
        """Take the named lock (:class:`LockBusy` when not ``blocking`` and it is held)."""
        ...

    def describe(self) -> str:
        """Where the objects are, for messages."""
        ...


class AbstractLock(Protocol):
    def release(self) -> None: ...


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_IOV_MAX = 1024  # Linux's limit on buffers per writev


def _write_all(fd: int, parts: Sequence[Buffer]) -> None:
    """Write every part, in order, with as few system calls as the kernel allows.

    Parts are byte buffers (``bytes``, ``bytearray``, views of one-byte items), as every
    caller's are: a pack's two parts a blob, a snapshot's digests cast to bytes. They go
    to ``writev`` as they are: casting each to a byte view first cost a Python call per
    16 KiB of received data, for the rare short write that the slow path below handles.
    """
    views: Sequence[Buffer] = parts
    i = 0
    while i < len(views):
        batch = views[i : i + _IOV_MAX]
        n = os.writev(fd, batch)
        if n == sum(map(len, batch)):
            i += len(batch)
            continue
        # A short write (a signal, a full disk): byte views from here, on from where it stopped.
        views = [memoryview(p).cast("B") for p in views[i:]]
        i = 0
        for v in views:
            if n >= len(v):
                n -= len(v)
                i += 1
            else:
                views[i] = v[n:]
                break


class _FileLock:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class LocalBackend:
    """Objects as files under ``root`` (directories 0700, files 0600: migrated disks are private).

    Writes go to a temporary file that is fsync'ed and renamed into place, and
    the directory is fsync'ed, so an object is either whole or absent after a
    crash. Locks are ``flock`` on files under ``root/.locks``: every process of
    this host that opens the same root sees them, and the kernel drops them
    when the holder dies.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._dirs: set[Path] = set()
        self._spools_swept = False

    def describe(self) -> str:
        return str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def _parent(self, path: Path) -> None:
        parent = path.parent
        if parent in self._dirs:
            return
        if not parent.is_dir():
            # One level at a time: mkdir(parents=True) gives the parents it makes the umask's mode.
            missing = [parent, *(p for p in parent.parents if p != self.root and self.root in p.parents)]
            for d in reversed(missing):
                if not d.is_dir():
                    d.mkdir(mode=0o700, exist_ok=True)
                    fsync_dir(d.parent)
        self._dirs.add(parent)

    def write(self, name: str, data: Data, *, exclusive: bool = False) -> None:
        path = self._path(name)
        self._parent(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(data):x}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                _write_all(fd, _parts(data))
                os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                try:
                    os.link(tmp, path)  # fails if the name exists: never replace
                except FileExistsError:
                    raise ObjectExists(f"object {name!r} exists already") from None
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)

    def spool(self) -> LocalSpool:
        """A new object written as it grows, named only once whole (not part of the contract).

        The chunk store writes a pack straight into its file this way instead of
        building it in memory first (``repository.py``): its name is the hash of
        its bytes, known only at the end. The file is hidden (``data/.spool-…``)
        until :meth:`LocalSpool.commit` makes it durable and renames it into place;
        spools that a dead process of this host left are removed on the first call.
        """
        folder = self.root / "data"
        if not self._spools_swept:
            folder.mkdir(mode=0o700, exist_ok=True)
            _sweep_spools(folder)
            self._spools_swept = True
        tmp = folder / f"{_SPOOL_PREFIX}{_host()}-{os.getpid()}-{next(_spool_numbers)}.tmp"
        return LocalSpool(self, tmp)

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(name) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder opens read-only: it is not an object
            os.close(fd)
            raise ObjectNotFound(name)
        try:
            if length is None:
                length = os.fstat(fd).st_size - offset
            out = os.pread(fd, length, offset)
            while len(out) < length:  # a short read is only possible at the end of the file
                more = os.pread(fd, length - len(out), offset + len(out))
                if not more:
                    raise ValueError(f"object {name!r} is shorter than {offset}+{length} bytes")
                out += more
            return out
        finally:
            os.close(fd)

    def size(self, name: str) -> int:
        try:
            st = self._path(name).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(name) from None
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(name)
        return st.st_size

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self, prefix: str) -> list[str]:
        folder = prefix.rpartition("/")[0]
        base = self.root / folder if folder else self.root
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for f in filenames:
                if f.startswith("."):
                    continue
                name = f if rel == "." else f"{rel}/{f}"
                if name.startswith(prefix):
                    out.append(name)
        out.sort()
        return out

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def lock(self, name: str, *, exclusive: bool, blocking: bool = True) -> _FileLock:
        # Under a hidden folder: no object name can start with a dot, so none collides with a lock.
        path = self.root / ".locks" / check_name(name)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockBusy(f"lock {name!r} is held") from None
            raise
        return _FileLock(fd)


_SPOOL_PREFIX = ".spool-"
_spool_numbers = itertools.count()  # per process: two backends on one root never share a name


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace("/", "_") or "host"


def _sweep_spools(folder: Path) -> None:
    """Remove the spools of this host's processes that are gone (a crash mid-pack)."""
    mine = f"{_SPOOL_PREFIX}{_host()}-"
    for path in folder.glob(f"{mine}*.tmp"):
        pid = path.name[len(mine) :].partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)


class LocalSpool:
    """A file under the store being appended to; durable and visible only after :meth:`commit`."""

    def __init__(self, backend: LocalBackend, tmp: Path) -> None:
        self._backend = backend
        self._tmp = tmp
        self._fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def append(self, parts: Sequence[Buffer]) -> None:
        """Write the parts at the end (into the page cache: not durable until commit)."""
        _write_all(self._fd, parts)

    def commit(self, name: str) -> None:
        """fsync, rename to ``name`` (replacing an object of that name) and fsync its folder."""
        path = self._backend._path(name)
        self._backend._parent(path)
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1
        try:
            os.replace(self._tmp, path)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tmp.unlink(missing_ok=True)


@contextmanager
def locked(backend: Backend, name: str, *, exclusive: bool, blocking: bool = True) -> Iterator[None]:
    held = backend.lock(name, exclusive=exclusive, blocking=blocking)
    try:
        yield
    finally:
        held.release()
