"""An old userland for the agent's install test: a Debian bullseye root (Python 3.9, curl), cached.

Built once with ``debootstrap --variant=minbase --include=python3,curl,wget
bullseye`` from the mirror apt uses here (like tests/guest.py's guest) and
kept under ``/var/tmp/opensmc-bullseye-cache/<recipe hash>/rootfs``
(``OPENSMC_BULLSEYE_CACHE`` moves it): CI runs on this same machine, so the
minutes of the first build are paid once. Tests copy nothing: each test
chroots into the cached root and the install script's files (under
/opt/opensmc-agent inside it) are removed by its own ``--uninstall``.
Builds need root, ``debootstrap`` and a reachable mirror; otherwise the
calling test skips. ``python -m tests.bullseye`` builds (or finds) it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.guest import _mirror

RECIPE = {"suite": "bullseye", "variant": "minbase", "include": ["python3", "curl", "wget", "ca-certificates"]}


def cache_root() -> Path:
    return Path(os.environ.get("OPENSMC_BULLSEYE_CACHE", "/var/tmp/opensmc-bullseye-cache"))


def bullseye_root() -> Path:
    """The cached root directory (shared: leave it as you found it), building it if needed."""
    root = cache_root() / hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]
    rootfs = root / "rootfs"
    if (root / "done").exists():
        return rootfs
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).exists():
        pytest.skip("debootstrap is not installed (Debian package debootstrap)")
    if os.geteuid() != 0:
        pytest.skip("building the bullseye root needs root (debootstrap)")
    root.mkdir(parents=True, exist_ok=True)
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second test process waits for the first build
        if not (root / "done").exists():
            shutil.rmtree(rootfs, ignore_errors=True)
            result = subprocess.run(
                [debootstrap, f"--variant={RECIPE['variant']}", f"--include={','.join(RECIPE['include'])}",
                 str(RECIPE["suite"]), str(rootfs), _mirror()],
                capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )  # fmt: skip
            if result.returncode != 0:
                pytest.skip(f"debootstrap could not build bullseye: {result.stdout[-1500:]} {result.stderr[-1500:]}")
            for sub in ("usr/share/doc", "usr/share/man", "usr/share/locale", "var/cache/apt", "var/lib/apt/lists"):
                shutil.rmtree(rootfs / sub, ignore_errors=True)
            (root / "done").write_text(json.dumps(RECIPE, indent=1))
    return rootfs


if __name__ == "__main__":
    print(bullseye_root())
