"""Disk space for a job's data: checked before a run is prepared, and a full disk met while syncing.

Before Preparing hands a run to the agent, :func:`shortfall` compares what
the run may write with the free space of the server's disk where it writes
(the staging directory, and the chunk store when it is local), less the
reserve the receiver keeps for the database (``--disk-reserve``). What a run
may write is its worst case: the selected disks' size less the chunks the
staging already holds (zero and duplicate chunks take no space, but their
share is not known before the disk is read). A run that does not fit is
refused: the job turns InError ``Server.InsufficientDiskSpace`` with a
StatusInfo saying how much is free and how much more is needed, and
StartReplicationJob tries again once space is freed. (It does not wait in
Preparing: a job there cannot be stopped.) ``--no-space-check`` lets such runs
start anyway (sources known to be mostly empty); a disk that fills up during
the run then stops it InError ``Receiver.DiskFull``
(``agent_tasks.receiver_disk_full``, called by the receiver).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from opensmc.chunkstore.staging import StagingError, StagingIndex
from opensmc.receiver.space import SpaceGuard, mib
from opensmc.service.context import Services

log = logging.getLogger("opensmc.dataplane")

#: ErrorCode of a run refused before Preparing for lack of disk space
NO_ROOM_CODE = "Server.InsufficientDiskSpace"
#: the receiver's code for a run stopped by a full disk
DISK_FULL_CODE = "Receiver.DiskFull"


def guard(svc: Services) -> SpaceGuard:
    """The directories of this server's disk that a run writes into, and the reserve kept free there."""
    paths = [svc.settings.staging_dir]
    if not svc.settings.image_store:
        paths.append(svc.settings.store_dir)
    return SpaceGuard(paths, svc.settings.disk_reserve)


def shortfall(svc: Services, volumes: list[tuple[Path, int]]) -> str | None:
    """Why a run may not start for lack of disk space (None: it fits, or the check is off).

    `volumes`: (staging index path, bytes the run copies) for each disk of the run.
    """
    if not svc.settings.space_check:
        return None
    g = guard(svc)
    low = g.lowest()
    if low is None:
        return None
    path, free = low
    room = free - g.reserve
    if sum(size for _p, size in volumes) <= room:
        return None  # the common case, without reading a staging index
    needed = sum(max(size - _held(p), 0) for p, size in volumes)
    if needed <= room:
        return None
    log.warning("a run needs up to %s of disk space, %s free on %s", mib(needed), mib(free), path)
    return (
        f"The server's disk has too little free space for this run: it may write up to {mib(needed)} (the "
        f"selected disks less what the server holds already; zero and duplicate chunks take none), but {path} "
        f"has {mib(free)} free, of which {mib(g.reserve)} is kept for the database. Free at least "
        f"{mib(needed - room)} (delete images no longer needed, or move the data dir to a larger disk), then "
        "StartReplicationJob again; a server started with --no-space-check starts such runs anyway."
    )


def _held(path: Path) -> int:
    """Bytes of a disk that its staging index already holds chunks for (0 when there is none)."""
    try:
        disk = StagingIndex.read_disk(path)
    except (OSError, StagingError):
        return 0
    return int(np.count_nonzero(disk.digests.any(axis=1))) * disk.chunk_size

