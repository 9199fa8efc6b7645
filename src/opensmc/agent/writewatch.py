"""Was the source disk written while it was being read? (Python 3.6, standard library only.)

A disk that is written during a pass gives an image that matches neither the
disk before nor after the writes. The agent cannot stop the writes, but it
can see them, and send what changed again:

* a block device (``/dev/sda``, ``/dev/vda1``): its write counters, the
  ``stat`` file of ``/sys/dev/block/MAJOR:MINOR`` (that is
  ``/sys/block/<dev>/stat``, or ``/sys/class/block/<part>/stat`` for a
  partition): writes completed and sectors written;
* an image file (``--disk FILE``): its size, mtime and ctime (nanoseconds).

:func:`mark` reads that state (an opaque tuple, None when it cannot be
known), :func:`changed_since` compares it with a mark, and :func:`passes`
yields a disk's ranges pass after pass: it marks the disk before a pass and
checks after it, and a pass during which the disk changed is followed by
another pass over the disk, which sends only the chunks whose hash differs
from what the receiver holds, up to :data:`EXTRA_PASSES` times. A disk still changing after those
passes finishes with a warning (``note``), which the server shows in the
job's StatusInfo and the run record.

Writes still in the page cache are not counted by the block device until
they are written back; a source that must be consistent should be quiet (its
services stopped) or be read from a snapshot (LVM, or a frozen filesystem),
see docs/operations.md.
"""

# Python 3.6, like the rest of the agent: no `from __future__ import annotations`; annotations are strings.

import os
import stat
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import TypeVar

    R = TypeVar("R")

#: passes over a disk after the first one, while it keeps being written
EXTRA_PASSES = 2
#: seconds: how old a file's last change must be before it is marked (coarser than the kernel's clock tick)
SETTLE = 0.05



def _block_stat(path: "str") -> "tuple[int, ...] | None":
    st = os.stat(path)
    sysfs = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/stat"
    try:
        with open(sysfs) as f:
            fields = f.read().split()
    except OSError:
        return None
    # Documentation/block/stat.rst: 4 writes completed, 5 writes merged, 6 sectors written
    if len(fields) < 7:
        return None
    return (int(fields[4]), int(fields[6]))


def mark(path: "str") -> "tuple[int, ...] | None":
    """The disk's write state now: block device counters or a file's size and times (None: unknown)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISBLK(st.st_mode):
        return _block_stat(path)
    if stat.S_ISREG(st.st_mode):
        # A file's times move in the kernel's coarse clock ticks (a few ms): a write in the
        # tick of the mark would leave them as they were. Mark only once the last change is
        # SETTLE seconds old, so that any later write lands in a later tick.
        for _ in range(20):
            newest = max(st.st_mtime_ns, st.st_ctime_ns) / 1e9
            if time.time() - newest >= SETTLE:
                break
            time.sleep(SETTLE)
            st = os.stat(path)
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return None


def changed_since(path: "str", before: "tuple[int, ...] | None") -> bool:
    """Whether the disk was written since ``before`` was taken (False when that cannot be known)."""
    if before is None:
        return False
    now = mark(path)
    return now is not None and now != before


def passes(path: "str", ranges: "Iterable[R]", again: "Callable[[], None]", written: "dict[str, int]") -> "Iterator[R]":
    """The disk's ranges to send, and again while the disk was written during the pass before.

    Marks the disk before each pass; after a pass that saw writes it counts one
    in ``written[path]``, calls ``again()`` (which fetches the receiver's hash
    map anew, so the next pass sends only what changed) and yields the ranges
    once more, at most :data:`EXTRA_PASSES` times.
    """
    todo = list(ranges)
    extra = 0
    while True:
        before = mark(path)
        yield from todo
        if not changed_since(path, before):
            return
        written[path] = written.get(path, 0) + 1
        if extra >= EXTRA_PASSES:
            return
        extra += 1
        again()


def note(written: "dict[str, int]") -> "dict[str, object]":
    """What a task reports about writes seen (``written``: passes that saw writes, by disk path).

    ``still_changing`` lists the disks whose last pass saw writes too: their
    image may be inconsistent; the others were synced again after the writes.
    """
    return {
        "disks_written": sorted(written),
        "passes_with_writes": max(written.values()) if written else 0,
        "still_changing": sorted(p for p, n in written.items() if n > EXTRA_PASSES),
    }
