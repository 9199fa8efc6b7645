"""`opensmc image list|show|export|verify|boot-test|serve`: the images a migration made.

By default the commands talk to the server over HTTP (``/opensmc/v1/images``,
signed with the AccessKey found like ``opensmc call`` finds it). With
``--data-dir DIR`` they read the image store on this machine instead: for an
operator on the server (names and jobs come from ``DIR/opensmc.db`` when the
server uses SQLite there).

``export`` writes a sparse raw file (all-zero chunks become holes) or a
qcow2, prints the SHA-256 of what it wrote and checks the disk against the
manifest's SHA-256; a failed check removes the output and exits 1. On a
terminal it shows a progress bar (bytes, rate, ETA) on stderr; otherwise it
prints one summary line there at the end (bytes, seconds, rate).
``boot-test`` and ``serve`` (:mod:`opensmc.cli.image_boot`) need ``--data-dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from opensmc.cli.credentials import load
from opensmc.cli.errors import UsageError
from opensmc.cli.image_access import PIECE, ImageCliError, Images, LocalImages, RemoteImages
from opensmc.cli.output import id_columns, plain_console

_ZERO = bytes(PIECE)


# command line -------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND")

    from opensmc.cli.main import add_client_options

    def common(q: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_client_options(q)
        q.add_argument("--data-dir", type=Path, default=None, help="read the server's image store here instead of HTTP")
        return q

    q = common(sub.add_parser("list", help="list your images"))
    q.add_argument("--json", action="store_true", help="print the images as a JSON list")
    q = common(sub.add_parser("show", help="show an image: its disks, sizes and SHA-256"))
    q.add_argument("image_id")
    q.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    q.add_argument("--chunks", action="store_true", help="with --json: include the per-chunk hashes")
    q = common(sub.add_parser("export", help="write one disk of an image to a file"))
    q.add_argument("image_id")
    q.add_argument("--disk", type=int, default=0, help="disk number in the image (0 = system disk)")
    q.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    q.add_argument("-o", "--output", required=True, type=Path, help="the file to write")
    q = common(sub.add_parser("verify", help="re-check every chunk and every disk's SHA-256"))
    q.add_argument("image_id")
    q = common(sub.add_parser("boot-test", help="boot a disk under QEMU and judge it from the serial console"))
    q.add_argument("image_id")
    q.add_argument("--disk", type=int, default=0, help="disk number in the image (0 = system disk)")
    q.add_argument("--timeout", type=float, default=300.0, help="seconds before a boot without verdict fails")
    q.add_argument("--silence", type=float, default=None, help="fail after this many seconds without console output")
    q.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="auto: KVM when it boots guests here, else TCG (emulation)")  # fmt: skip
    q.add_argument("--bus", choices=("virtio", "sata", "ide"), default="virtio",
                   help="how the disk is attached (virtio: as on a KVM cloud)")  # fmt: skip
    q.add_argument("--json", action="store_true", help="print the verdict as JSON")
    q = common(sub.add_parser("serve", help="serve a disk read-only over NBD, straight from the image store"))
    q.add_argument("image_id")
    q.add_argument("--disk", type=int, default=0, help="disk number in the image (0 = system disk)")
    q.add_argument("--nbd", action="store_true", help="serve over NBD (the only protocol so far)")
    q.add_argument("--listen", default="127.0.0.1:10809", help="HOST:PORT, or unix:/path for a Unix socket")


def run(args: argparse.Namespace) -> int:
    """Errors propagate to :func:`opensmc.cli.main.main`, which reports them in the one CLI format."""
    if not args.image_command:
        raise UsageError("give a subcommand: list, show, export, verify, boot-test or serve")
    if args.image_command in ("boot-test", "serve"):
        from opensmc.cli import image_boot

        return image_boot.run(args)
    if args.image_command == "export":
        _check_output(args.output)  # before any download: a 40 GiB transfer must not end in "no such directory"
    if args.data_dir and not args.data_dir.is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: no such directory")
    source: Images = (
        LocalImages(args.data_dir) if args.data_dir else RemoteImages(load(args.credentials, args.endpoint))
    )
    if args.image_command == "list":
        return cmd_list(source, args.json)
    if args.image_command == "show":
        doc = source.show(args.image_id, args.chunks and args.json)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            print_image(doc)
        return 0
    if args.image_command == "export":
        sha = export(source, args.image_id, args.disk, args.format, args.output)
        print(f"sha256 {sha}  {args.output}")
        return 0
    return cmd_verify(source, args.image_id)


def _check_output(out: Path) -> None:
    parent = out.parent
    if out.is_dir():
        raise UsageError(f"-o {out}: is a directory; give a file name")
    if not parent.is_dir():
        raise UsageError(f"-o {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"-o {out}: directory {parent} is not writable")


def _checksum(item: dict[str, Any]) -> str:
    return {True: "verified", False: "FAILED", None: "-"}[item.get("ChecksumVerified")]


def _boot(item: dict[str, Any]) -> str:
    """`passed`, `FAILED (disk 0: firmware)` or `-`: the latest boot test of each disk."""
    tests = item.get("BootTest") or []
    if not tests:
        return "-"
    failed = [f"disk {t['Disk']}: {t.get('Stage')}" for t in tests if t.get("Verdict") != "passed"]
    return f"FAILED ({'; '.join(failed)})" if failed else "passed"


def _adapted(item: dict[str, Any]) -> str:
    """`adapted (disk 0)`, `NOT adapted (disk 0)` or `-` (no adaptation was tried)."""
    runs = item.get("OsAdaptation") or []
    if not runs:
        return "-"
    return "; ".join(f"{'adapted' if a.get('Adapted') else 'NOT adapted'} (disk {a['Disk']})" for a in runs)


def print_image(doc: dict[str, Any]) -> None:
    from rich.table import Table

    console = plain_console()
    for key in ("ImageId", "Name", "JobId", "RunId", "State", "CreationTime"):
        console.print(f"{key + ':':<14}{doc.get(key) or '-'}", highlight=False)
    console.print(f"{'Checksum:':<14}{_checksum(doc)}", highlight=False)
    console.print(f"{'Boot test:':<14}{_boot(doc)}", highlight=False)
    for t in doc.get("BootTest") or []:
        console.print(f"{'':<14}disk {t['Disk']}: {t.get('Verdict')} at {t.get('Stage')}: {t.get('Reason')} "
                      f"({t.get('Time')}, log {t.get('Log')})", highlight=False)  # fmt: skip
    adaptations = doc.get("OsAdaptation") or []
    console.print(f"{'Adaptation:':<14}{_adapted(doc)}", highlight=False)
    for a in adaptations:
        console.print(f"{'':<14}disk {a['Disk']}: {a.get('Guest') or 'unknown guest'}, {a.get('Seconds')} s, "
                      f"log {a.get('Log')}", highlight=False)  # fmt: skip
        for line in [*(a.get("Changes") or []), *(f"warning: {w}" for w in a.get("Warnings") or [])]:
            console.print(f"{'':<16}{line}", highlight=False)
    table = Table("Disk", "Size", "Bytes", "SHA-256")
    for d in doc.get("Disks", []):
        table.add_row(str(d["Index"]), _size(d["Size"]), str(d["Size"]), str(d.get("Sha256", "")))
    id_columns(table, "SHA-256", "Bytes")
    console.print(table)


def cmd_list(source: Images, as_json: bool) -> int:
    items = source.list_images()
    if as_json:
        print(json.dumps(items, indent=2))
        return 0
    if not items:
        print("No images yet: a finished replication job run makes one.")
        return 0
    from rich.table import Table

    console = plain_console()
    table = Table("ImageId", "Name", "JobId", "Created", "Disks", "Checksum", "Boot test")
    for item in items:
        disks = ", ".join(f"{d['Index']}: {_size(d['Size'])}" for d in item.get("Disks", []))
        table.add_row(
            item["ImageId"], item.get("Name") or "", item.get("JobId") or "", item["CreationTime"], disks,
            _checksum(item), _boot(item),
        )  # fmt: skip
    id_columns(table, "ImageId", "JobId", "Created")
    console.print(table)
    return 0


def cmd_verify(source: Images, image_id: str) -> int:
    problems = source.verify(image_id)
    if problems:
        for line in problems:
            print(f"FAILED: {line}")
        return 1
    print(f"{image_id}: every chunk and every disk's SHA-256 check out")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


# export -----------------------------------------------------------------------------------------


class ExportMeter:
    """How far an export got: a rich progress bar on a terminal, a summary line otherwise.

    Both go to stderr (stdout carries the ``sha256 …`` line scripts read).
    `total` is None when the size is not known ahead (a qcow2 download).
    """

    def __init__(self, label: str, total: int | None, *, quiet: bool = False, terminal: bool | None = None) -> None:
        from rich.console import Console

        self.label = label
        self.total = total
        self.quiet = quiet
        self.done = 0
        self.console = Console(stderr=True)
        self.terminal = self.console.is_terminal if terminal is None else terminal
        self._bar: Any = None
        self._task: Any = None
        self._started = time.monotonic()

    def __enter__(self) -> ExportMeter:
        self._started = time.monotonic()
        if self.terminal and not self.quiet:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)

    def summary(self) -> str:
        seconds = max(time.monotonic() - self._started, 1e-6)
        return f"{self.label}: {self.done} bytes in {seconds:.1f} s ({_size(int(self.done / seconds))}/s)"

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
        if kind is None and not self.quiet:
            print(self.summary(), file=sys.stderr)


def _metered(blocks: Iterable[bytes], meter: ExportMeter) -> Iterator[bytes]:
    for block in blocks:
        meter.advance(len(block))
        yield block


def export(source: Images, image_id: str, disk: int, fmt: str, out: Path, *, quiet: bool = False) -> str:
    """Write disk ``disk`` to ``out``; return the SHA-256 of the file written.

    The disk's content is checked against the manifest's SHA-256 (for qcow2, by
    reading it back through ``qemu-img`` when that is installed). On a failure
    nothing is left at ``out``.
    """
    manifest = source.show(image_id)
    disks = manifest["Disks"]
    if not 0 <= disk < len(disks):
        raise ImageCliError(f"image {image_id} has no disk {disk} (it has {len(disks)})")
    # Known when the job ran with checksum=true; otherwise every chunk is still checked against
    # its hash on the way, and the SHA-256 printed is the one computed now.
    expected: str | None = disks[disk].get("Sha256")
    size = int(disks[disk]["Size"])
    partial = out.with_name(f".{out.name}.partial")
    label = f"export {image_id} disk {disk} ({fmt})"
    try:
        if fmt == "raw":
            with ExportMeter(label, size, quiet=quiet) as meter:
                sha = write_sparse(_metered(source.raw(image_id, disk), meter), partial, size)
            if expected is not None and sha != expected:
                raise ImageCliError(f"the export's SHA-256 {sha} is not the manifest's {expected}")
        else:
            with ExportMeter(label, None, quiet=quiet) as meter:
                source.qcow2(image_id, disk, partial, meter.advance)
                if meter.done == 0:  # written in one step (local store): count the file
                    meter.advance(partial.stat().st_size)
            sha = file_sha256(partial)
            content = qcow2_content_sha256(partial)
            if content is None:
                print(
                    "note: qemu-img is not installed here, so the qcow2 was not read back; the export "
                    "checked the disk against the manifest SHA-256 while converting it",
                    file=sys.stderr,
                )
            elif expected is not None and content != expected:
                raise ImageCliError(f"the qcow2 holds a disk with SHA-256 {content}, not {expected}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    if not quiet:
        proof = (
            f"matches the manifest SHA-256 {expected}"
            if expected is not None
            else "every chunk matched its hash (the image records no SHA-256: its job ran without checksum)"
        )
        print(f"disk {disk} of {image_id}: {size} bytes, {proof}", file=sys.stderr)
    return sha


def write_sparse(blocks: Iterable[bytes], out: Path, size: int) -> str:
    """Write a byte stream to ``out``, seeking over all-zero 64 KiB pieces; return its SHA-256."""
    sha = hashlib.sha256()
    offset = 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for block in _pieces(blocks):
            sha.update(block)
            if block != _ZERO[: len(block)]:
                os.pwrite(fd, block, offset)
            offset += len(block)
        if offset != size:
            raise ImageCliError(f"got {offset} bytes, the disk has {size}")
        os.ftruncate(fd, offset)  # the trailing holes
        os.fsync(fd)
    finally:
        os.close(fd)
    return sha.hexdigest()


def _pieces(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Re-cut a stream into PIECE-sized pieces (the last may be shorter)."""
    buf = bytearray()
    for block in blocks:
        if not buf and len(block) % PIECE == 0:
            for i in range(0, len(block), PIECE):
                yield block[i : i + PIECE]
            continue
        buf += block
        while len(buf) >= PIECE:
            yield bytes(buf[:PIECE])
            del buf[:PIECE]
    if buf:
        yield bytes(buf)


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    return sha.hexdigest()


def qcow2_content_sha256(path: Path) -> str | None:
    """SHA-256 of the disk a qcow2 holds (via a temporary sparse raw), or None without qemu-img."""
    if shutil.which("qemu-img") is None:
        return None
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".raw", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run(
            ["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(path), name],
            check=True,
            capture_output=True,
        )
        return file_sha256(Path(name))
    except subprocess.CalledProcessError as exc:
        raise ImageCliError(f"qemu-img cannot read the qcow2: {exc.stderr.decode(errors='replace')}") from None
    finally:
        os.unlink(name)
