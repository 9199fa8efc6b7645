"""Disk images for end-to-end migrations: a partition table, ext4 file systems, random regions.

:func:`build_disk` lays out a real-looking disk in a sparse file: a GPT or MBR
table written by ``sfdisk``, ext4 partitions made by ``mkfs.ext4 -d`` (each in
a file of the partition's size, then copied into place at the partition's
offset) and a region of random bytes after the last partition. Tests skip
when the tools are missing (:func:`require_tools`).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

MiB = 1 << 20
CHUNK = 16 * 1024  # the data plane's chunk size (and the chunk store's dedupe unit)


def require_tools(*extra: str) -> None:
    """Skip the calling test when the disk tools are not installed."""
    for tool in ("sfdisk", "mkfs.ext4", "e2fsck", *extra):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists() and not Path("/sbin", tool).exists():
            pytest.skip(f"{tool} is not installed")


def _tool(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/sbin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip(f"{name} is not installed")


@dataclass(frozen=True)
class Partition:
    number: int
    offset: int  # bytes
    size: int  # bytes


@dataclass(frozen=True)
class Disk:
    path: Path
    size: int
    partitions: tuple[Partition, ...]
    random_region: tuple[int, int]  # (offset, length): free space filled with random bytes

    def sha256(self) -> str:
        return sha256_file(self.path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def nonzero_bytes(path: Path, chunk: int = CHUNK) -> int:
    """Bytes in the chunks of ``path`` that hold any non-zero byte: what a full send moves."""
    total = 0
    zero = bytes(chunk)
    with path.open("rb") as f:
        while block := f.read(chunk):
            if block != zero[: len(block)]:
                total += len(block)
    return total


def _populate(root: Path, rng: random.Random, files: int, label: str) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text(f"opensmc-e2e-{label}\n")
    (root / "etc" / "fstab").write_text("/dev/sda1 / ext4 defaults 0 1\n")
    data = root / "var" / "data"
    data.mkdir(parents=True)
    for i in range(files):
        size = rng.randint(1, 256) * 1024
        (data / f"file{i:03d}.bin").write_bytes(rng.randbytes(size))
    (root / "empty-dir").mkdir()
    (root / "text.txt").write_text("hello from the source disk\n" * 1000)


def _copy_into(src: Path, dst: Path, offset: int) -> None:
    """Copy ``src`` into ``dst`` at ``offset``, skipping zero blocks so ``dst`` stays sparse."""
    zero = bytes(MiB)
    with src.open("rb") as fin, dst.open("r+b") as fout:
        pos = 0
        while block := fin.read(MiB):
            if block != zero[: len(block)]:
                fout.seek(offset + pos)
                fout.write(block)
            pos += len(block)


def build_disk(
    path: Path,
    size: int = 128 * MiB,
    *,
    label: str = "gpt",
    parts: int = 2,
    seed: int = 0,
    files: int = 20,
    random_mib: int = 4,
) -> Disk:
    """A ``size``-byte disk image at ``path``: ``parts`` ext4 partitions plus random bytes at the end."""
    require_tools()
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
    # Partitions share the space up to the random region and a 1 MiB tail (the GPT backup).
    first = MiB
    usable = size - first - (random_mib + 2) * MiB
    each = (usable // parts) // MiB * MiB
    layout = [Partition(n + 1, first + n * each, each) for n in range(parts)]
    script = f"label: {label}\n" + "".join(
        f"start={p.offset // 512}, size={p.size // 512}, type=linux\n"
        if label == "gpt"
        else f"start={p.offset // 512}, size={p.size // 512}, type=83\n"
        for p in layout
    )
    subprocess.run(
        [_tool("sfdisk"), "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
        input=script,
        text=True,
        check=True,
        capture_output=True,
    )
    work = path.parent / f".{path.name}.build"
    work.mkdir(exist_ok=True)
    try:
        for p in layout:
            root = work / f"root{p.number}"
            _populate(root, rng, files, f"{path.stem}-p{p.number}")
            fs = work / f"fs{p.number}.img"
            with fs.open("wb") as f:
                f.truncate(p.size)
            subprocess.run(
                [_tool("mkfs.ext4"), "-q", "-F", "-L", f"part{p.number}", "-d", str(root), str(fs)],
                check=True,
                capture_output=True,
                env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
            )
            _copy_into(fs, path, p.offset)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    region = (layout[-1].offset + layout[-1].size + MiB // 2, random_mib * MiB)
    with path.open("r+b") as f:
        f.seek(region[0])
        f.write(rng.randbytes(region[1]))
    return Disk(path, size, tuple(layout), region)


def change_fraction(disk: Disk, fraction: float, seed: int = 1) -> int:
    """Overwrite about ``fraction`` of the disk (whole 64 KiB chunks) with new random bytes.

    Only the random region is touched, so the file systems stay clean. Returns the bytes changed.
    """
    rng = random.Random(seed)
    want = max(1, int(disk.size * fraction) // CHUNK)
    offset, length = disk.random_region
    first = -(-offset // CHUNK)
    last = (offset + length) // CHUNK
    if want > last - first:
        raise ValueError(f"the random region holds only {last - first} chunks, {want} asked")
    chosen = rng.sample(range(first, last), want)
    with disk.path.open("r+b") as f:
        for idx in chosen:
            f.seek(idx * CHUNK)
            f.write(rng.randbytes(CHUNK))
    return want * CHUNK


def fsck_partitions(image: Path, disk: Disk) -> list[str]:
    """``e2fsck -fn`` every ext4 partition of ``image`` (laid out like ``disk``); the failures."""
    failures = []
    for p in disk.partitions:
        part = image.parent / f".{image.name}.p{p.number}"
        try:
            with image.open("rb") as fin, part.open("wb") as fout:
                fin.seek(p.offset)
                left = p.size
                while left:
                    block = fin.read(min(4 * MiB, left))
                    fout.write(block)
                    left -= len(block)
            res = subprocess.run([_tool("e2fsck"), "-fn", str(part)], capture_output=True, text=True)
            if res.returncode != 0:
                failures.append(f"partition {p.number}: e2fsck rc {res.returncode}: {res.stdout}{res.stderr}")
        finally:
            part.unlink(missing_ok=True)
    return failures


def partition_table(image: Path) -> str:
    """``sfdisk --dump`` of ``image``, without the line naming the file."""
    out = subprocess.run([_tool("sfdisk"), "--dump", str(image)], capture_output=True, text=True, check=True).stdout
    return "\n".join(line.replace(str(image), "IMG") for line in out.splitlines())
