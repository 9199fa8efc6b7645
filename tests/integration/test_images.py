"""Images: dedupe across runs, export (raw, qcow2), verify, delete, and a real ext4 disk."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from opensmc.agent.pipeline import ReplicationResult, replicate
from opensmc.images.store import ImageCorrupt, ImageExists, ImageStore, compare_with_source
from opensmc.receiver.volume import StagingVolume
from opensmc.wire.frames import decode_frame

MiB = 1024 * 1024
CS = 64 * 1024


class VolumeSender:
    """The receiver without HTTP: decode and apply each frame to a staging volume."""

    def __init__(self, vol: StagingVolume) -> None:
        self.vol = vol

    def send_batch(self, frames: Sequence[bytes]) -> None:
        for enc in frames:
            self.vol.apply(decode_frame(enc))


def sync(src: Path, vol: StagingVolume, offset: int = 0, length: int | None = None) -> ReplicationResult:
    res = replicate(str(src), VolumeSender(vol), offset=offset, length=length, previous=vol.hashes())
    vol.flush()
    return res


def make_image(path: Path, size: int, seed: int = 1) -> bytearray:
    rnd = random.Random(seed)
    data = bytearray(b"\0" * size)
    pos = 0
    while pos < size:
        n = rnd.randrange(64 * 1024, MiB)
        if rnd.random() < 0.4:
            data[pos : pos + n] = rnd.randbytes(min(n, size - pos))
        pos += n
    path.write_bytes(data)
    return data


def test_three_runs_dedupe_export_verify_delete(tmp_path: Path) -> None:
    size = 48 * MiB
    src = tmp_path / "disk.img"
    data = make_image(src, size)
    vol = StagingVolume.create(tmp_path / "vol", size)
    store = ImageStore(tmp_path / "store")
    rnd = random.Random(2)
    copies: list[bytes] = []
    for run in range(3):
        if run:  # change 1% of the disk between runs, in chunk-sized writes
            for _ in range(size // CS // 100):
                at = rnd.randrange(size // CS) * CS
                data[at : at + CS] = rnd.randbytes(CS)
            src.write_bytes(data)
        res = sync(src, vol)
        manifest = store.create_image(f"m-{run}", [vol])
        assert compare_with_source(manifest.disks[0], res.hashes) == []  # checksum=true proof
        copies.append(bytes(data))
        if run == 0:
            one_image = store.space_used()
    assert store.space_used() <= 1.2 * one_image

    with pytest.raises(ImageExists):
        store.create_image("m-0", [vol])

    for run in range(3):
        assert store.verify(f"m-{run}").ok
        out = tmp_path / f"m-{run}.raw"
        store.export(f"m-{run}", 0, "raw", out)
        assert out.read_bytes() == copies[run]
        assert out.stat().st_blocks * 512 <= len(store.get(f"m-{run}").disks[0].hashes()) * CS + MiB  # sparse

    qcow = tmp_path / "m-2.qcow2"
    store.export("m-2", 0, "qcow2", qcow)
    back = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow), str(back)], check=True)
    assert back.read_bytes() == copies[2]

    # Deleting the first image frees only what no other image uses.
    store.delete_image("m-0")
    assert store.verify("m-1").ok and store.verify("m-2").ok
    store.delete_image("m-1")
    store.delete_image("m-2")
    assert store.space_used() == 0 and store.list_images() == []
    vol.close()


def test_verify_and_export_catch_corruption(tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    make_image(src, 8 * MiB)
    vol = StagingVolume.create(tmp_path / "vol", 8 * MiB)
    sync(src, vol)
    store = ImageStore(tmp_path / "store")
    manifest = store.create_image("m-x", [vol])
    first = next(h for h in manifest.disks[0].chunks if h is not None)
    chunk = store.root / "chunks" / first[:2] / first[2:4] / first
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 1
    chunk.write_bytes(raw)
    report = store.verify("m-x")
    assert not report.ok and report.bad_chunks and report.bad_disks == [0]
    with pytest.raises(ImageCorrupt):
        store.export("m-x", 0, "raw", tmp_path / "out.raw")
    assert not (tmp_path / "out.raw").exists()
    vol.close()


@pytest.mark.skipif(
    not (shutil.which("sfdisk") and shutil.which("mkfs.ext4")), reason="needs sfdisk, mkfs.ext4"
)
def test_partitioned_ext4_disk(tmp_path: Path) -> None:
    size, part_start, part_size = 64 * MiB, MiB, 62 * MiB
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(size)
    layout = f"label: gpt\nstart={part_start // 512}, size={part_size // 512}, type=linux\n"
    subprocess.run(["sfdisk", "-q", str(disk)], input=layout.encode(), check=True)
    tree = tmp_path / "root"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("migrated\n")
    (tree / "data.bin").write_bytes(os.urandom(5 * MiB))
    fs = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(fs), f"{part_size // 1024}k"], check=True)
    with open(fs, "rb") as fin, open(disk, "r+b") as fout:  # dd the filesystem into place
        fout.seek(part_start)
        shutil.copyfileobj(fin, fout, MiB)
    source = disk.read_bytes()

    whole = StagingVolume.create(tmp_path / "v-disk", size)
    part = StagingVolume.create(tmp_path / "v-part", part_size)
    r_whole = sync(disk, whole)
    r_part = sync(disk, part, offset=part_start, length=part_size)
    store = ImageStore(tmp_path / "store")
    manifest = store.create_image("m-ext4", [whole, part])
    assert compare_with_source(manifest.disks[0], r_whole.hashes) == []
    assert compare_with_source(manifest.disks[1], r_part.hashes) == []

    store.export("m-ext4", 0, "raw", tmp_path / "disk.out")
    assert (tmp_path / "disk.out").read_bytes() == source
    dump = subprocess.run(["sfdisk", "-d", str(tmp_path / "disk.out")], capture_output=True, check=True)
    assert f"start={part_start // 512:>12}, size={part_size // 512:>12}".replace(
        " ", ""
    ) in dump.stdout.decode().replace(" ", "")
    store.export("m-ext4", 1, "raw", tmp_path / "part.out")
    fsck = subprocess.run(["e2fsck", "-fn", str(tmp_path / "part.out")], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    whole.close()
    part.close()
