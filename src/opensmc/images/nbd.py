"""Serve one disk of an image over NBD, read-only, straight from the chunk store.

nbdkit (Debian packages ``nbdkit`` and ``nbdkit-plugin-python``) runs
:mod:`opensmc.images.nbd_plugin`, which reads blobs through
:class:`~opensmc.images.store.ImageStore`: nothing is exported or copied
first, so attaching a 500 GiB image costs what the guest or tool reads.
nbdkit rather than ``qemu-nbd`` because qemu-nbd can only serve a file, which
would mean exporting the whole disk first. ``opensmc image boot-test`` and
``opensmc image serve --nbd`` both use this.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from opensmc.images import nbd_plugin

PLUGIN_DIR = Path("/usr/lib/x86_64-linux-gnu/nbdkit/plugins")


class NbdError(Exception):
    """nbdkit cannot serve: the message says what to install or fix."""


def nbdkit_binary() -> str:
    found = shutil.which("nbdkit") or ("/usr/sbin/nbdkit" if Path("/usr/sbin/nbdkit").exists() else None)
    if found is None:
        raise NbdError("serving over NBD needs nbdkit: install the Debian packages nbdkit and nbdkit-plugin-python")
    return found


def python_plugin_available(nbdkit: str) -> bool:
    result = subprocess.run([nbdkit, "python", "--version"], capture_output=True, text=True)
    return result.returncode == 0


@dataclass(frozen=True)
class Listen:
    """Where to listen: a Unix socket path, or a TCP host and port."""

    unix: Path | None = None
    host: str = "127.0.0.1"
    port: int = 10809

    @staticmethod
    def parse(text: str) -> Listen:
        """``unix:/path``, ``/path``, ``HOST:PORT``, ``:PORT`` or ``HOST`` (port 10809, NBD's own)."""
        if text.startswith("unix:"):
            return Listen(unix=Path(text[5:]))
        if text.startswith("/"):
            return Listen(unix=Path(text))
        host, sep, port = text.rpartition(":")
        if not sep:
            return Listen(host=text)
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--listen {text}: the port must be a number from 1 to 65535")
        return Listen(host=host.strip("[]") or "127.0.0.1", port=int(port))

    def uri(self, export: str = "") -> str:
        if self.unix is not None:
            return f"nbd+unix:///{export}?socket={self.unix}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{export}"

    def args(self) -> list[str]:
        if self.unix is not None:
            return ["--unix", str(self.unix)]
        return ["--ipaddr", self.host, "--port", str(self.port)]


def command(store_root: Path, image_id: str, disk: int, listen: Listen) -> list[str]:
    """The nbdkit command line (foreground, read-only) that serves ``disk`` of ``image_id``."""
    nbdkit = nbdkit_binary()
    if not python_plugin_available(nbdkit):
        raise NbdError("nbdkit has no python plugin: install the Debian package nbdkit-plugin-python")
    pythonpath = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
    return [
        nbdkit, "--foreground", "--readonly", "--exit-with-parent", *listen.args(),
        "python", str(Path(nbd_plugin.__file__).resolve()),
        f"store={store_root.resolve()}", f"image={image_id}", f"disk={disk}", f"pythonpath={pythonpath}",
    ]  # fmt: skip


def start(
    store_root: Path, image_id: str, disk: int, listen: Listen, log: Path, timeout: float = 30.0
) -> subprocess.Popen[bytes]:
    """Start nbdkit and wait until it accepts connections (for a Unix socket: the socket exists)."""
    cmd = command(store_root, image_id, disk, listen)
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NbdError(f"nbdkit exited with status {proc.returncode}: {_tail(log)}")
        if listen.unix is not None and listen.unix.exists():
            return proc
        if listen.unix is None and _tcp_open(listen.host, listen.port):
            return proc
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise NbdError(f"nbdkit did not start listening within {timeout:g} s: {_tail(log)}")


def _tcp_open(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(log: Path, n: int = 1500) -> str:
    try:
        return log.read_text(errors="replace")[-n:].strip() or "(no output)"
    except OSError:
        return "(no log)"
