"""Boot test: start an image's disk under QEMU and judge the boot from its serial console.

The disk is attached read-only from the chunk store over NBD
(:mod:`opensmc.images.nbd`), under a copy-on-write overlay (QEMU's
``snapshot=on``: the guest's writes go to a temporary file QEMU deletes), so
the image is never written and never exported. Without nbdkit's python
plugin the disk is exported to a temporary sparse raw file beside the logs
instead (it costs the disk's data in space and time; the verdict is the same).

What the guest says on its first serial port decides. The firmware's own
screen goes there too (SeaBIOS's serial console, turned on through fw_cfg
``etc/sercon-port``), so a guest whose disk has no bootloader, or whose GRUB
drops to its rescue prompt, is seen, not only what a kernel prints. Each
line is matched against :data:`MARKERS`, in boot order:

* **pass**: a login prompt (``… login:``), or systemd reaching the
  multi-user or graphical target;
* **fail**: the firmware finds no bootable disk, GRUB's rescue or command
  prompt, a kernel panic, an initramfs or emergency shell;
* **fail, silence**: nothing new for ``silence`` seconds, or the timeout
  passes, or QEMU exits: the verdict names the last stage reached and the
  last console lines;
* **fail, no bootloader**: the firmware started a boot sector that holds no
  boot code (all zeros, as ``sfdisk`` leaves a data disk) and nothing spoke
  for :data:`EMPTY_BOOT_WAIT` seconds.

With ``accel="auto"`` KVM is tried first when ``/dev/kvm`` can be opened. A
KVM boot that fails without a definite sign (the firmware silent for
:data:`KVM_PROBE` seconds, the console silent for :data:`KVM_SILENCE`, the
timeout) is run again under TCG, QEMU's emulator: some nested and container
set-ups have a KVM that runs the firmware and GRUB but stalls every kernel,
and only TCG tells that apart from a guest that hangs. When TCG then passes,
the results dir remembers it (:data:`KVM_NOTE`) and later tests here go
straight to TCG. A definite failure (no bootable disk, a panic, a rescue or
emergency shell) is never retried.

The console log and a JSON verdict are kept beside the image (images are
immutable): ``<results dir>/<image id>/disk<N>-<UTC time>.log`` and
``….json``, and ``latest-disk<N>.json``.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from opensmc.images import nbd
from opensmc.images.store import ImageError, ImageStore

__all__ = ["BootTestError", "BootVerdict", "boot_test", "latest_verdicts", "qemu_binary"]

QEMU = "qemu-system-x86_64"
#: seconds KVM gets to show the firmware's first output before the test falls back to TCG
KVM_PROBE = 10.0
#: under ``auto``, seconds of console silence after which a KVM boot is tried again under TCG
KVM_SILENCE = 20.0
#: in the results dir: KVM was found to stall guests that TCG boots, so ``auto`` goes straight to TCG
KVM_NOTE = ".kvm-stalls"
#: seconds of silence after the firmware starts a boot sector of zeros before the verdict "no bootloader"
EMPTY_BOOT_WAIT = 5.0
#: the folder of a data dir that holds boot tests
RESULTS_DIR = "boot-tests"
Accel = Literal["auto", "kvm", "tcg"]
Bus = Literal["virtio", "sata", "ide"]

#: the stages of a boot, in order; a verdict names the last one reached
STAGES = ("started", "firmware", "bootloader", "kernel", "initramfs", "userspace", "login")

#: (stage, outcome, pattern, what it means). outcome None: progress; "pass" / "fail": the verdict.
MARKERS: tuple[tuple[str, str | None, re.Pattern[str], str], ...] = tuple(
    (stage, outcome, re.compile(pattern), meaning)
    for stage, outcome, pattern, meaning in (
        ("firmware", None, r"SeaBIOS \(version|iPXE|Booting from (Hard Disk|DVD|Floppy)", "firmware started"),
        ("firmware", "fail", r"No bootable device|Boot failed: not a bootable disk|No boot device",
         "the firmware found no bootable disk: no bootloader is installed in the boot sector"),
        ("bootloader", None, r"GRUB loading|Welcome to GRUB|GNU GRUB|Booting `|SYSLINUX|ISOLINUX|systemd-boot",
         "bootloader started"),
        ("bootloader", "fail", r"grub rescue>",
         "GRUB is in its rescue prompt: it cannot find its modules or configuration (wrong root or prefix)"),
        ("bootloader", "fail", r"^\s*grub>\s*$",
         "GRUB is at its command prompt: it found no grub.cfg to boot from"),
        ("kernel", None, r"Linux version \d|Decompressing Linux|Booting the kernel|Probing EDD", "kernel started"),
        ("kernel", "fail", r"Kernel panic - not syncing", "the kernel panicked"),
        ("initramfs", None, r"Loading, please wait|Begin: |dracut|Run /init as init process", "initramfs started"),
        ("initramfs", "fail", r"\(initramfs\)|Dropping to a shell|dracut:/#|dracut-initqueue.*[Tt]imeout",
         "the initramfs dropped to a shell: it did not find the root file system (a missing disk driver, "
         "or fstab/GRUB naming a device that is not there)"),
        ("userspace", None, r"systemd\[1\]|Welcome to .*!|INIT: version|Started .*\.|Reached target",
         "init started"),
        ("userspace", "fail",
         r"You are in emergency mode|Give root password for maintenance|Entering emergency mode|"
         r"emergency shell|Press Enter for maintenance|Cannot open access to console",
         "the system is in its emergency shell: a file system in fstab did not mount"),
        ("login", "pass", r"\blogin:\s*$|Reached target .*(Multi-User System|Graphical Interface)",
         "the system reached a login prompt"),
    )
)

_ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[()][A-Za-z0-9]|[A-Za-z=>])")


def match_line(line: str) -> tuple[str, str | None, str] | None:
    """(stage, outcome, meaning) of the first marker a console line matches: verdicts before progress.

    Verdicts first, because a deciding line may also look like progress
    ("Reached target … Multi-User System" is a "Reached target" line).
    """
    for want_verdict in (True, False):
        for stage, outcome, pattern, meaning in MARKERS:
            if (outcome is not None) == want_verdict and pattern.search(line):
                return stage, outcome, meaning
    return None


class BootTestError(Exception):
    """The test could not run at all; the message says what to install or fix."""


@dataclass
class BootVerdict:
    image_id: str
    disk: int
    passed: bool
    stage: str  #: the last stage reached (STAGES)
    reason: str
    last_lines: list[str] = field(default_factory=list)
    accel: str = "tcg"
    bus: str = "virtio"
    attach: str = "nbd"  #: "nbd" (from the chunk store) or "export" (a temporary raw copy)
    seconds: float = 0.0
    started_at: str = ""
    log: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "passed" if self.passed else "failed"

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "verdict": self.verdict}


def qemu_binary() -> str:
    found = shutil.which(QEMU)
    if found is None:
        raise BootTestError(
            f"boot-test needs {QEMU} on the machine that holds the image store: "
            "install the Debian package qemu-system-x86 (apt-get install qemu-system-x86)"
        )
    return found


def kvm_openable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


class _Console:
    """The serial console log as QEMU writes it: new text, whole lines, and the unfinished last line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.raw = ""  #: the unfinished line as written, escapes and all (an escape may be cut by a read)
        self.lines: list[str] = []
        self.last_change = time.monotonic()
        self.any_output = False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def partial(self) -> str:
        return _clean(self.raw)

    def poll(self) -> tuple[list[str], str]:
        """Lines completed since the last poll, and the current partial line (a prompt ends without newline)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return [], ""
        if data:
            self.pos += len(data)
            self.last_change = time.monotonic()
            self.any_output = True
            *done, self.raw = (self.raw + self.decoder.decode(data)).replace("\r", "\n").split("\n")
            new = [c for c in map(_clean, done) if c.strip()]
            self.lines.extend(new)
            return new, self.partial
        return [], self.partial

    def tail(self, n: int = 15) -> list[str]:
        lines = self.lines + ([self.partial] if self.partial.strip() else [])
        return [line[:200] for line in lines[-n:]]


def _clean(text: str) -> str:
    return _ANSI.sub("", text).rstrip()


def _boot_sector_empty(store: ImageStore, image_id: str, disk: int) -> bool | None:
    """True when the disk's first 440 bytes (an MBR's boot code) are all zero; None when unreadable."""
    try:
        index = store.get(image_id).disks[disk].index
        h = index.hash_at(0)
        first = bytes(index.chunk_length(0)) if h is None else store.read_chunk(h)
    except (ImageError, IndexError):
        return None
    return not any(first[:440])


def boot_test(
    store: ImageStore,
    image_id: str,
    results_dir: Path,
    *,
    disk: int = 0,
    timeout: float = 300.0,
    silence: float | None = None,
    accel: Accel = "auto",
    bus: Bus = "virtio",
    memory_mib: int = 1024,
    on_line: Callable[[str], None] | None = None,
) -> BootVerdict:
    """Boot disk ``disk`` of ``image_id``; keep the console log in ``results_dir``; return the verdict.

    ``silence``: give up after this many seconds without console output (default:
    the timeout, so only the timeout ends a quiet boot). Raises :class:`BootTestError`
    when QEMU is missing or the image cannot be attached.
    """
    qemu = qemu_binary()
    try:
        manifest = store.get(image_id)
    except ImageError as exc:
        raise BootTestError(str(exc)) from None
    if not 0 <= disk < len(manifest.disks):
        raise BootTestError(f"image {image_id} has no disk {disk} (it has {len(manifest.disks)})")
    out_dir = results_dir / image_id
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    log = out_dir / f"disk{disk}-{stamp}.log"
    work = Path(tempfile.mkdtemp(prefix=f".boot-{image_id}-", dir=out_dir))
    notes: list[str] = []
    server: subprocess.Popen[bytes] | None = None
    sock_dir: Path | None = None
    try:
        try:
            # A Unix socket path must be short (108 bytes): a data dir deep in a tree would not do.
            sock_dir = Path(tempfile.mkdtemp(prefix="osmc-nbd-"))
            sock = sock_dir / "s"
            if store.location.is_s3:  # the nbdkit plugin reads a local store directory
                raise nbd.NbdError("the image store is on S3")
            root = Path(store.location.url.removeprefix("file://"))
            server = nbd.start(root, image_id, disk, nbd.Listen(unix=sock), work / "nbdkit.log")
            drive, attach = nbd.Listen(unix=sock).uri(), "nbd"
        except nbd.NbdError as exc:
            notes.append(f"attached by a temporary export, not over NBD: {exc}")
            raw = work / "disk.raw"
            try:
                store.export(image_id, disk, "raw", raw)
            except (ImageError, OSError) as err:
                raise BootTestError(f"cannot export image {image_id} disk {disk} for the test: {err}") from None
            drive, attach = str(raw), "export"
        order = [accel]
        kvm_note = results_dir / KVM_NOTE
        if accel == "auto":
            if not kvm_openable():
                order = ["tcg"]
                notes.append("/dev/kvm cannot be opened: emulated with TCG")
            elif kvm_note.exists():
                order = ["tcg"]
                notes.append(f"an earlier boot test here found that KVM boots no guest ({kvm_note}; delete it to "
                             "try KVM again): emulated with TCG")  # fmt: skip
            else:
                order = ["kvm", "tcg"]
        empty_boot = bool(_boot_sector_empty(store, image_id, disk))
        verdict: BootVerdict | None = None
        kvm_failed = False
        for i, mode in enumerate(order):
            retry = i + 1 < len(order)
            log.unlink(missing_ok=True)
            quiet = silence if silence is not None else timeout
            result = _run_qemu(
                qemu, drive, mode, bus, memory_mib, log, work, timeout, min(quiet, KVM_SILENCE) if retry else quiet,
                KVM_PROBE if retry else None, empty_boot, on_line,
            )  # fmt: skip
            if result is None:
                notes.append(f"KVM gave no firmware output within {KVM_PROBE:g} s: emulated with TCG instead")
                kvm_failed = True
                continue
            verdict, definite = result
            if retry and not verdict.passed and not definite:
                # A KVM that runs real-mode code but stalls the kernel (some nested or container set-ups)
                # looks like a guest that hangs: only TCG can tell the two apart.
                os.replace(log, log.with_suffix(".kvm.log"))
                kvm_log = log.with_suffix(".kvm.log")
                notes.append(f"under KVM: {verdict.reason} (console: {kvm_log}); ran again with TCG")
                kvm_failed = True
                continue
            break
        assert verdict is not None  # the last mode never probes
        if kvm_failed and verdict.passed:
            kvm_note.write_text(f"KVM stalled a guest that TCG booted ({image_id} disk {disk}, {stamp})\n")
        verdict.image_id, verdict.disk, verdict.attach = image_id, disk, attach
        verdict.started_at, verdict.log = stamp, str(log)
        verdict.notes = notes + verdict.notes
        doc = json.dumps(verdict.to_json(), indent=2)
        (out_dir / f"disk{disk}-{stamp}.json").write_text(doc)
        tmp = out_dir / f".latest-disk{disk}.json.tmp"
        tmp.write_text(doc)
        os.replace(tmp, out_dir / f"latest-disk{disk}.json")
        return verdict
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(work, ignore_errors=True)
        if sock_dir is not None:
            shutil.rmtree(sock_dir, ignore_errors=True)


def _run_qemu(
    qemu: str,
    drive: str,
    accel: str,
    bus: Bus,
    memory_mib: int,
    log: Path,
    work: Path,
    timeout: float,
    silence: float,
    probe: float | None,
    empty_boot: bool,
    on_line: Callable[[str], None] | None,
) -> tuple[BootVerdict, bool] | None:
    """One boot and whether its verdict is definite (a marker decided it, not silence, a timeout or an exit).

    None when ``probe`` is set and the firmware said nothing within it (try another accel).
    """
    sercon = work / "sercon-port"
    sercon.write_bytes((0x3F8).to_bytes(2, "little"))  # COM1: SeaBIOS copies its screen there
    if bus == "virtio":
        disk_args = ["-drive", f"file={drive},format=raw,if=virtio,snapshot=on,cache=unsafe"]
    elif bus == "ide":
        disk_args = ["-drive", f"file={drive},format=raw,if=ide,snapshot=on,cache=unsafe"]
    else:
        disk_args = [
            "-device", "ahci,id=ahci", "-drive", f"file={drive},format=raw,if=none,id=d0,snapshot=on,cache=unsafe",
            "-device", "ide-hd,drive=d0,bus=ahci.0",
        ]  # fmt: skip
    cmd = [
        qemu, "-accel", accel, "-machine", "pc", "-m", str(memory_mib), "-smp", "1",
        "-nodefaults", "-display", "none", "-vga", "none", "-no-reboot", "-nic", "none",
        "-fw_cfg", f"name=etc/sercon-port,file={sercon}",
        "-chardev", f"file,id=console,path={log}", "-serial", "chardev:console",
        *disk_args,
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(work)}  # snapshot=on's overlay lives and dies with the test
    qemu_log = work / f"qemu-{accel}.log"
    start = time.monotonic()
    with qemu_log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT, env=env)
    console = _Console(log)
    stage, meaning = "started", "QEMU started"
    outcome: str | None = None
    definite = False
    handed_over = False
    quiet_limit = silence
    try:
        while True:
            done, partial = console.poll()
            if on_line is not None:
                for line in done:
                    on_line(line)
            handed_over = handed_over or any("Booting from Hard Disk" in line for line in [*done, partial])
            for line in [*done, partial]:
                found = match_line(line)
                if found is None:
                    continue
                m_stage, m_outcome, m_meaning = found
                if m_outcome is not None:
                    stage, meaning, outcome, definite = m_stage, m_meaning, m_outcome, True
                    break
                if STAGES.index(m_stage) >= STAGES.index(stage):  # progress only ever moves forward
                    stage, meaning = m_stage, m_meaning
            now = time.monotonic()
            if outcome is not None:
                break
            if probe is not None and not console.any_output and now - start > probe:
                return None
            if proc.poll() is not None:
                console.poll()
                exit_note = _tail(qemu_log)
                if proc.returncode != 0 and not console.any_output:
                    raise BootTestError(f"QEMU ({accel}) could not start the guest: {exit_note}")
                outcome, meaning = "fail", f"the guest stopped (reset or powered off) after: {meaning}"
                break
            if now - start > timeout:
                outcome, meaning = "fail", f"no verdict within the timeout of {timeout:g} s; last stage: {meaning}"
                break
            if empty_boot and stage == "firmware" and handed_over and now - console.last_change > EMPTY_BOOT_WAIT:
                # Zeros for boot code run on into nothing; no bootloader will ever speak.
                outcome, definite = "fail", True
                meaning = (
                    "the firmware started the disk's boot sector, which holds no boot code: no bootloader is installed"
                )
                break
            if now - console.last_change > quiet_limit:
                outcome, meaning = "fail", f"silence for {quiet_limit:g} s after: {meaning}"
                break
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    seconds = round(time.monotonic() - start, 1)
    if outcome == "fail" and stage == "bootloader" and "silence" in meaning:
        meaning += " (a kernel that logs nowhere but the screen: its command line needs console=ttyS0)"
    verdict = BootVerdict(
        image_id="", disk=0, passed=outcome == "pass", stage=stage, reason=meaning,
        last_lines=console.tail(), accel=accel, bus=bus, seconds=seconds,
    )  # fmt: skip
    return verdict, definite


def _tail(path: Path, n: int = 800) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip() or "(no output)"
    except OSError:
        return "(no log)"


def latest_verdicts(results_dir: Path, image_id: str) -> dict[int, dict[str, object]]:
    """The last boot test of each disk of an image that had one."""
    out: dict[int, dict[str, object]] = {}
    folder = results_dir / image_id
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("latest-disk*.json")):
        try:
            doc = json.loads(path.read_text())
            out[int(doc["disk"])] = doc
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def results_dir(data_dir: Path) -> Path:
    """Where a data dir keeps boot tests: beside the image store, one folder per image."""
    return data_dir / RESULTS_DIR


def boot_doc(results_dir: Path, image_id: str) -> list[dict[str, object]]:
    """The latest boot test of each disk, as ``image list/show`` and the image routes show it (``BootTest``)."""
    return [
        {
            "Disk": d,
            "Verdict": t.get("verdict"),
            "Stage": t.get("stage"),
            "Reason": t.get("reason"),
            "Time": t.get("started_at"),
            "Log": t.get("log"),
        }
        for d, t in sorted(latest_verdicts(results_dir, image_id).items())
    ]
