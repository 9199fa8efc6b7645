"""Being gentle on the source server: low CPU priority (nice) and low I/O priority for the agent.

A source server is in production while it is migrated. By default the agent
runs at nice 10 and in the *best-effort* I/O scheduling class at its lowest
level (7): under BFQ its reads get the smallest share of the disk when others
want it; mq-deadline serves the best-effort class as one (the nice level and
``bandwidth_limit`` are what remain there). Not the *idle* class, which was
the default before: an idle-class read waits while any other class has
requests queued (BFQ: for as long as the disk stays busy; mq-deadline: up to
its ``prio_aging_expire``, 10 s), so on a busy production disk a migration
could make almost no progress. ``--io-class idle`` still asks for it. Set
once at start, before any thread: threads inherit both. The I/O class is set with the
``ioprio_set`` system call through ``ctypes`` (no ``ionice`` binary needed),
and with ``ionice`` where the system call number of this architecture is not
known. Python 3.6 compatible, standard library only (docs/agent.md).
"""

import ctypes
import ctypes.util
import logging
import os
import platform
import shutil
import subprocess

__all__ = ["IO_CLASSES", "apply"]

log = logging.getLogger("opensmc.agent")

#: ``--io-class`` values: the kernel's I/O scheduling classes (``ionice -c``), and "none" to leave it
IO_CLASSES = ("idle", "best-effort", "realtime", "none")
_CLASS_IDS = {"realtime": 1, "best-effort": 2, "idle": 3}
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_WHO_PROCESS = 1
# ioprio_set's number per architecture (linux/arch/*/syscall tables)
_SYS_IOPRIO_SET = {
    "x86_64": 251,
    "amd64": 251,
    "i386": 289,
    "i686": 289,
    "aarch64": 30,
    "arm64": 30,
    "armv7l": 314,
    "ppc64le": 273,
    "ppc64": 273,
    "s390x": 282,
    "riscv64": 30,
}


#: the level of the best-effort and realtime classes: the lowest, as the agent yields to the source's own work
IO_LEVEL = 7


def apply(nice: int = 10, io_class: str = "best-effort") -> "list[str]":
    """Lower this process's priorities; returns what was done, for the log. Never raises."""
    done: "list[str]" = []
    if nice:
        try:
            done.append(f"nice {os.nice(nice)}")
        except OSError as e:
            log.warning("cannot change the CPU priority (nice %d): %s", nice, e)
    if io_class != "none":
        if io_class not in _CLASS_IDS:
            raise ValueError(f"I/O class must be one of {', '.join(IO_CLASSES)}, got {io_class!r}")
        if _ioprio_set(_CLASS_IDS[io_class]):
            done.append(f"I/O class {io_class}" + ("" if io_class == "idle" else f" {IO_LEVEL}"))
    return done


def _ioprio_set(cls: int) -> bool:
    # The idle class has no levels; the others get the lowest (0 is the highest, 7 the lowest).
    value = (cls << _IOPRIO_CLASS_SHIFT) | (0 if cls == 3 else IO_LEVEL)
    number = _SYS_IOPRIO_SET.get(platform.machine())
    if number is not None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            if libc.syscall(number, _IOPRIO_WHO_PROCESS, 0, value) == 0:
                return True
            err = ctypes.get_errno()
            log.warning("cannot set the I/O priority (ioprio_set): %s", os.strerror(err))
            return False
        except (OSError, AttributeError, TypeError) as e:
            log.debug("ioprio_set through libc failed (%s); trying ionice", e)
    ionice = shutil.which("ionice")
    if ionice is None:
        log.warning("cannot set the I/O priority: no ioprio_set for %s and no ionice", platform.machine())
        return False
    args = [ionice, "-c", str(cls)] + ([] if cls == 3 else ["-n", str(IO_LEVEL)]) + ["-p", str(os.getpid())]
    try:
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("cannot set the I/O priority with ionice: %s", e)
        return False
    return True
