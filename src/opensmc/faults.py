"""Crash points: named places where a test can make this process die at once, as ``kill -9`` would.

``OPENSMC_CRASH_AT=<name>[,<name>…]`` in a process's environment makes it
SIGKILL itself the first time it reaches one of those points. Nothing else
reads the variable; without it a crash point costs one set lookup. The
points sit on the phase boundaries of a job run, where a crash is most
likely to leave something half done, so the tests can prove that none does
(``tests/e2e/test_phase_kills.py``): the names are in :data:`POINTS`.
"""

from __future__ import annotations

import os
import signal

#: every crash point there is, in the order a run reaches them
POINTS = (
    "prepare.allocated",  # staging allocated, the job not yet Syncing
    "pack.written",  # a pack is in the store, its index object not yet
    "process.recorded",  # the image row exists (Creating), no snapshot yet
    "process.adapting",  # the unadapted disks sealed in a temporary snapshot, OS adaptation about to run
    "process.sealed",  # the snapshot exists, the image not yet Available nor the job Cleaning
    "clean.rotated",  # old images rotated away, staging not yet released, the run not closed
    "clean.released",  # staging released, the job not yet Finished/Waiting
    "build.patched",  # a file-level build's kept image patched by debugfs, its new index not yet in place
    "gc.marked",  # gc decided what is dead and bumped the generation, nothing deleted yet
    "gc.sweeping",  # gc deleted some of the dead packs, not all
)

_AT = frozenset(p for p in os.environ.get("OPENSMC_CRASH_AT", "").split(",") if p)
_unknown = _AT - set(POINTS)
if _unknown:  # a typo would make a crash test pass without crashing
    raise SystemExit(f"OPENSMC_CRASH_AT names unknown crash points {sorted(_unknown)}; known: {', '.join(POINTS)}")


def crash_point(name: str) -> None:
    """Die here (SIGKILL, no cleanup) if the environment asks for it."""
    if name in _AT:
        os.kill(os.getpid(), signal.SIGKILL)
