"""The agent lowers its own CPU and I/O priority (agent/priority.py), in a child process of its own."""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys

import pytest

from opensmc.agent.main import add_arguments

PROBE = """
import ctypes, ctypes.util, os, sys
from opensmc.agent import priority
before = os.nice(0)
done = priority.apply(int(sys.argv[1]), sys.argv[2])
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
io = libc.syscall(252, 1, 0)  # ioprio_get(IOPRIO_WHO_PROCESS, self) on x86_64
print(os.nice(0) - before, io >> 13, io & 0x1FFF, ";".join(done))
"""


def probe(nice: int, io_class: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(nice), io_class], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.strip().split(maxsplit=3)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the probe reads ioprio_get by its x86_64 number")
def test_best_effort_is_set_at_level_7_and_idle_still_can_be() -> None:
    delta, io_class, level, done = probe(10, "best-effort")
    assert (delta, io_class, level) == ("10", "2", "7") and "I/O class best-effort 7" in done
    delta, io_class, _level, done = probe(0, "idle")  # still there for those who ask for it
    assert (delta, io_class) == ("0", "3") and done == "I/O class idle"
    delta, io_class, *_ = probe(0, "none")  # left as it was: the kernel's default (no class set) is 0
    assert delta == "0" and io_class in ("0", "2")


def test_agent_run_defaults_to_nice_10_and_best_effort() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--server", "http://127.0.0.1:1"])
    assert (args.nice, args.io_class) == (10, "best-effort")
