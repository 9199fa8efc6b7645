"""The sample disk `opensmc demo` migrates, and the filesystem check of its export.

A sparse file with a GPT partition table (``sfdisk``) and one ext4 partition
made with ``mkfs.ext4 -d`` from a few files, or, without those tools, random
data in a few regions (said so on the terminal).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from opensmc.cli.demo_client import DemoError

MiB = 1 << 20


def say(text: str = "") -> None:
    print(text, flush=True)


@dataclass
class SampleDisk:
    path: Path
    size: int
    sha256: str
    partition: tuple[int, int] | None  #: (offset, size) of the ext4 partition, bytes
    what: str


def build_sample_disk(path: Path, size: int) -> SampleDisk:
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    partition = None
    sfdisk, mkfs = shutil.which("sfdisk"), shutil.which("mkfs.ext4")
    if sfdisk and mkfs:
        partition = _partition_and_format(path, sfdisk, mkfs)
        what = "GPT partition table, one ext4 partition with a few files"
    else:
        missing = " and ".join(n for n, p in (("sfdisk", sfdisk), ("mkfs.ext4", mkfs)) if not p)
        say(f"   {missing} not found (Debian: apt-get install fdisk e2fsprogs): using random regions instead")
        with path.open("r+b") as f:
            for at in (0, 1 * MiB, size // 3, size - 2 * MiB):
                f.seek(at)
                f.write(os.urandom(MiB))
        what = "random data in four 1 MiB regions, zeros elsewhere"
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MiB):
            sha.update(block)
    return SampleDisk(path, size, sha.hexdigest(), partition, what)


def _partition_and_format(path: Path, sfdisk: str, mkfs: str) -> tuple[int, int]:
    subprocess.run(
        [sfdisk, "--quiet", str(path)], input=b"label: gpt\nstart=2048, type=linux\n", check=True,
        capture_output=True,
    )  # fmt: skip
    table = json.loads(subprocess.run([sfdisk, "--json", str(path)], check=True, capture_output=True).stdout)
    part = table["partitiontable"]["partitions"][0]
    sector = int(table["partitiontable"].get("sectorsize", 512))
    offset, length = int(part["start"]) * sector, int(part["size"]) * sector
    with tempfile.TemporaryDirectory(prefix="opensmc-demo-") as tmp:
        content = Path(tmp) / "root"
        (content / "etc").mkdir(parents=True)
        (content / "home" / "demo").mkdir(parents=True)
        (content / "etc" / "hostname").write_text("opensmc-demo-source\n")
        (content / "README.txt").write_text("This filesystem was migrated by OpenSMC's demo.\n")
        for i in range(20):
            (content / "home" / "demo" / f"note-{i:02}.txt").write_text(f"note {i}\n" * (i + 1) * 50)
        (content / "home" / "demo" / "random.bin").write_bytes(os.urandom(4 * MiB))
        fs = Path(tmp) / "fs.img"
        with fs.open("wb") as f:
            f.truncate(length)
        subprocess.run([mkfs, "-q", "-F", "-d", str(content), str(fs)], check=True, capture_output=True)
        _copy_sparse(fs, path, offset)
    return offset, length


def _copy_sparse(src: Path, dst: Path, at: int) -> None:
    zero = bytes(64 * 1024)
    with src.open("rb") as f, dst.open("r+b") as g:
        pos = 0
        while block := f.read(len(zero)):
            if block != zero[: len(block)]:
                g.seek(at + pos)
                g.write(block)
            pos += len(block)


def fsck_partition(image: Path, offset: int, length: int) -> str:
    e2fsck = shutil.which("e2fsck")
    if not e2fsck:
        return "e2fsck not found: the filesystem check is skipped"
    with tempfile.TemporaryDirectory(prefix="opensmc-demo-") as tmp:
        part = Path(tmp) / "partition.img"
        with image.open("rb") as f, part.open("wb") as g:
            g.truncate(length)
            f.seek(offset)
            left = length
            while left > 0:
                block = f.read(min(MiB, left))
                if not block:
                    break
                if block.count(0) != len(block):
                    g.seek(length - left)
                    g.write(block)
                left -= len(block)
        res = subprocess.run([e2fsck, "-fn", str(part)], capture_output=True, text=True)
    if res.returncode != 0:
        raise DemoError(f"e2fsck finds the exported filesystem damaged:\n{res.stdout}{res.stderr}")
    return "e2fsck -fn on the exported partition: clean"
