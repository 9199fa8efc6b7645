"""One libguestfs appliance, driven command by command: ``guestfish --listen`` and ``--remote``.

libguestfs (Debian package ``libguestfs-tools``) edits a disk image through a
small appliance VM: no root mounts, no loop devices, nothing of the guest
runs on the host. Launching the appliance is the slow part (about 20 s under
TCG), so OS adaptation launches it once and sends every step to it:
``guestfish --listen`` starts a guestfish that holds the handle, and each
``guestfish --remote=PID -- CMD ARGS`` runs one command in it and returns its
output, so Python decides between steps (which guest this is, which
partition to grow) without a second launch.

The appliance runs with ``LIBGUESTFS_BACKEND=direct`` (QEMU started by
libguestfs itself, no libvirt). Under KVM it starts in seconds; some nested
and container set-ups have a ``/dev/kvm`` that opens but stalls every guest,
so :func:`open_session` gives KVM :data:`KVM_LAUNCH` seconds and then starts
again under TCG (``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``), as the boot
test does.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

__all__ = ["Guestfish", "GuestfishError", "open_session", "stop_tree"]

#: seconds the appliance gets to launch under KVM before it is started again under TCG
KVM_LAUNCH = 45.0
#: seconds it gets under TCG
TCG_LAUNCH = 240.0


class GuestfishError(Exception):
    """libguestfs is missing or a command failed; the message says which and why."""


def guestfish_binary() -> str:
    found = shutil.which("guestfish")
    if found is None:
        raise GuestfishError("OS adaptation needs libguestfs: install the Debian package libguestfs-tools")
    return found


class Guestfish:
    """A launched appliance with one drive (``/dev/sda`` inside it), read-write."""

    def __init__(self, drive: Path, fmt: str, work: Path, *, tcg: bool) -> None:
        self.binary = guestfish_binary()
        self.tcg = tcg
        self.work = work
        self.env = {**os.environ, "LIBGUESTFS_BACKEND": "direct", "TMPDIR": str(work)}
        if tcg:
            self.env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
        else:
            self.env.pop("LIBGUESTFS_BACKEND_SETTINGS", None)
        # The listener forks into the background and keeps its standard output: a file, not a pipe
        # (a pipe would not end until the listener does).
        out = work / "guestfish-listen.log"
        with out.open("wb") as sink:
            code = subprocess.run(
                [self.binary, "--listen", f"--format={fmt}", "-a", str(drive)],
                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, env=self.env, timeout=60,
            ).returncode  # fmt: skip
        text = out.read_text(errors="replace")
        found = re.search(r"GUESTFISH_PID=(\d+)", text)
        if code != 0 or found is None:
            raise GuestfishError(f"guestfish --listen failed: {text.strip()[-800:]}")
        self.pid = int(found.group(1))
        self.log, self.log_pos = out, len(text.encode())

    def __call__(self, *args: str, timeout: float = 600.0) -> str:
        """Run one guestfish command in the appliance; its standard output."""
        try:
            done = subprocess.run(
                [self.binary, f"--remote={self.pid}", "--", *args],
                capture_output=True, text=True, env=self.env, timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise GuestfishError(f"guestfish {args[0]} did not finish within {timeout:g} s") from None
        if done.returncode != 0:
            # The listener, not this client, prints a command's error: it is in the listener's log.
            message = (done.stderr + self._log_since()).strip().replace("libguestfs: error: ", "")
            raise GuestfishError(f"{args[0]}: {message[-1500:] or f'exit {done.returncode}'}")
        self._log_since()
        return done.stdout

    def _log_since(self) -> str:
        try:
            with self.log.open("rb") as f:
                f.seek(self.log_pos)
                data = f.read()
        except OSError:
            return ""
        self.log_pos += len(data)
        return data.decode(errors="replace")

    def lines(self, *args: str, timeout: float = 600.0) -> list[str]:
        return [line for line in self(*args, timeout=timeout).splitlines() if line.strip()]

    def close(self) -> None:
        """Unmount, flush and stop the appliance: every write is in the drive once this returns.

        Raises :class:`GuestfishError` when that cannot be made sure (the drive must not be used then).
        """
        try:
            self("umount-all", timeout=300)
            self("sync", timeout=300)
            self("shutdown", timeout=300)
            try:
                self("exit", timeout=60)
            except GuestfishError:
                pass  # the appliance is down and synced already
        finally:
            self.kill()

    def kill(self) -> None:
        """Stop the listener and its appliance (QEMU, its child), whatever state they are in."""
        stop_tree(self.pid)


def stop_tree(pid: int) -> None:
    """Stop a process and everything below it, children first."""
    for each in [*_descendants(pid), pid]:
        _stop(each)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out: list[int] = []
    todo = list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(parents.get(child, []))
    return out[::-1]


def _stop(pid: int) -> None:
    deadline = time.monotonic() + 10
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            if Path(f"/proc/{pid}/stat").exists() and " Z " in Path(f"/proc/{pid}/stat").read_text():
                return  # a zombie: dead, waiting for a parent that is not us
            time.sleep(0.1)
        deadline = time.monotonic() + 5


def _kvm_openable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def open_session(
    drive: Path, fmt: str, work: Path, kvm_note: Path, notes: list[str], pid_file: Path | None = None
) -> Guestfish:
    """A launched appliance on ``drive``: KVM when it works here, else TCG (``kvm_note`` remembers a stall)."""
    tcg_env = os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "")
    if "force_tcg" in tcg_env:
        order = [True]
    elif not _kvm_openable():
        order = [True]
        notes.append("/dev/kvm cannot be opened: the libguestfs appliance runs under TCG")
    elif kvm_note.exists():
        order = [True]
        notes.append(f"KVM stalls guests here ({kvm_note}): the libguestfs appliance runs under TCG")
    else:
        order = [False, True]
    for tcg in order:
        fish = Guestfish(drive, fmt, work, tcg=tcg)
        if pid_file is not None:  # the listener runs detached: whoever finds it after a crash stops it
            pid_file.write_text(str(fish.pid))
        try:
            fish("run", timeout=TCG_LAUNCH if tcg else KVM_LAUNCH)
            return fish
        except GuestfishError as exc:
            fish.kill()
            if tcg:
                raise
            notes.append(f"the appliance did not start under KVM ({exc}): started again under TCG")
            try:
                kvm_note.parent.mkdir(parents=True, exist_ok=True)
                kvm_note.write_text("KVM stalled the libguestfs appliance that TCG runs\n")
            except OSError:
                pass
    raise GuestfishError("the libguestfs appliance did not start")  # pragma: no cover - order is never empty
