"""Disk space on the receiver: the reserve it keeps free, and a full disk as a clear refusal.

The receiver writes packs and staging indexes onto the server's disk, which
(on SQLite, the default) also holds the database. It stops writing while the
free space is below a reserve (``--disk-reserve``, 64 MiB by default), so that
the database still has room to record what happened (the job turning InError,
a later StartReplicationJob) and the API keeps answering. A write that meets
a full disk anyway (another program filled it) is the same refusal: 507
``Receiver.DiskFull`` with the free space and what the disk still needs, and
the control plane's ``on_full`` callback turns the job InError with it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["DEFAULT_RESERVE", "DiskFull", "OnFull", "SpaceGuard", "is_disk_full", "mib"]

#: bytes kept free on the server's disk by default: a few packs in flight and the database's growth
DEFAULT_RESERVE = 64 * 1024 * 1024

#: ``on_full(volume id, message)``: the control plane's reaction (the job turns InError); runs on a worker thread
OnFull = Callable[[str, str], None]


class DiskFull(Exception):
    """The receiver may not write: ``free`` bytes left where it writes, below ``reserve``."""

    def __init__(self, path: Path, free: int, reserve: int) -> None:
        super().__init__(f"{path} has {mib(free)} free, below the reserve of {mib(reserve)}")
        self.path = path
        self.free = free
        self.reserve = reserve


def mib(n: int) -> str:
    return f"{max(n, 0) / (1 << 20):.1f} MiB"


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether an error (or what caused it) is a full disk or an exhausted quota."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFull):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class SpaceGuard:
    """Checks the free space of the local directories the receiver writes into."""

    def __init__(self, paths: Sequence[Path], reserve: int = DEFAULT_RESERVE) -> None:
        self.paths = list(paths)
        self.reserve = reserve

    def lowest(self) -> tuple[Path, int] | None:
        """The directory with the least free space, and that space (None when none can be measured)."""
        found: tuple[Path, int] | None = None
        for path in self.paths:
            probe = path
            while not probe.exists() and probe.parent != probe:
                probe = probe.parent  # the store directory may not exist before the first pack
            try:
                st = os.statvfs(probe)
            except OSError:
                continue
            free = st.f_bavail * st.f_frsize
            if found is None or free < found[1]:
                found = (path, free)
        return found

    def check(self) -> None:
        """Raise :class:`DiskFull` while the free space is below the reserve."""
        low = self.lowest()
        if low is not None and low[1] < self.reserve:
            raise DiskFull(low[0], low[1], self.reserve)

    def message(self, needed: int | None) -> str:
        """What a user reads: the disk is full, how much is free, and how much more this disk needs."""
        low = self.lowest()
        path, free = low if low is not None else (Path("?"), 0)
        text = (
            f"The server's disk is full: {path} has {mib(free)} free, and the receiver keeps "
            f"{mib(self.reserve)} free for the database."
        )
        if needed is not None:
            more = needed + self.reserve - free
            text += (
                f" This disk still needs up to {mib(needed)} (its size less the chunks the receiver holds; "
                "zero and duplicate chunks take no space)"
            )
            text += f": free at least {mib(more)} more" if more > 0 else ": free space"
        else:
            text += " Free space"
        return text + (
            " on the server (delete images no longer needed, or move the data dir to a larger disk), "
            "then StartReplicationJob resumes from the data already received."
        )
