"""Images on the chunk store: dedupe across runs, export (raw, qcow2), verify, delete + gc, a real ext4 disk."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from opensmc.agent.pipeline import ReplicationResult, replicate
from opensmc.chunkstore.repository import Repository
from opensmc.chunkstore.staging import StagingIndex
from opensmc.images.store import ImageCorrupt, ImageExists, ImageStore
from opensmc.wire.frames import decode_frame

MiB = 1024 * 1024
CS = 16 * 1024


class IndexSender:
    """The receiver without HTTP: decode each frame and write it into the store and a staging index."""

    def __init__(self, vol: StagingIndex, repo: Repository) -> None:
        self.vol = vol
        self.repo = repo

    def send_batch(self, frames: Sequence[bytes]) -> None:
        for enc in frames:
            frame = decode_frame(enc)
            if frame.is_zero:
                self.vol.zero(self.repo, frame.offset, frame.length)
            else:
                self.vol.write(self.repo, frame.offset, frame.data)


def sync(
    src: Path, vol: StagingIndex, store: ImageStore, offset: int = 0, length: int | None = None
) -> ReplicationResult:
    res = replicate(
        str(src), IndexSender(vol, store.repo), offset=offset, length=length, previous=vol.hashes(), chunk_size=CS
    )
    vol.checkpoint(store.repo)
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
    vol = StagingIndex.create(tmp_path / "vol.fidx", size, CS)
    store = ImageStore(tmp_path / "store")
    rnd = random.Random(2)
    copies: list[bytes] = []
    for run in range(3):
        if run:  # change 1% of the disk's 4 KiB blocks, at random, between runs
            for _ in range(size // 4096 // 100):
                at = rnd.randrange(size // 4096) * 4096
                data[at : at + 4096] = rnd.randbytes(4096)
            src.write_bytes(data)
        res = sync(src, vol, store)
        manifest = store.create_image(f"m-{run}", [vol.disk()])
        assert manifest.disks[0].hashes() == res.hashes  # the image names exactly what the agent read
        copies.append(bytes(data))
        if run == 0:
            one_image = store.space_used()
    assert store.space_used() <= 1.25 * one_image

    with pytest.raises(ImageExists):
        store.create_image("m-0", [vol.disk()])

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

    # Deleting the first image frees only what no other image uses (at the next gc).
    store.delete_image("m-0")
    assert not store.gc([vol.disk()]).deferred
    assert store.verify("m-1").ok and store.verify("m-2").ok
    store.delete_image("m-1")
    store.delete_image("m-2")
    vol.close()
    assert store.gc([]).packs_deleted > 0
    assert store.space_used() == 0 and store.list_images() == []
    assert store.check().ok


def test_verify_and_export_catch_corruption(tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    make_image(src, 8 * MiB)
    vol = StagingIndex.create(tmp_path / "vol.fidx", 8 * MiB, CS)
    store = ImageStore(tmp_path / "store")
    sync(src, vol, store)
    store.create_image("m-x", [vol.disk()])
    [pack] = store.backend.list("data/")
    path = tmp_path / "store" / pack
    raw = bytearray(path.read_bytes())
    raw[200] ^= 1  # inside the first blob's data
    path.chmod(0o600)
    path.write_bytes(raw)
    report = store.verify("m-x")
    assert not report.ok and report.bad_chunks
    with pytest.raises(ImageCorrupt):
        store.export("m-x", 0, "raw", tmp_path / "out.raw")
    assert not (tmp_path / "out.raw").exists()
    assert not store.check().ok
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

    whole = StagingIndex.create(tmp_path / "v-disk.fidx", size, CS)
    part = StagingIndex.create(tmp_path / "v-part.fidx", part_size, CS)
    store = ImageStore(tmp_path / "store")
    r_whole = sync(disk, whole, store)
    r_part = sync(disk, part, store, offset=part_start, length=part_size)
    manifest = store.create_image("m-ext4", [whole.disk(), part.disk()])
    assert manifest.disks[0].hashes() == r_whole.hashes
    assert manifest.disks[1].hashes() == r_part.hashes

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
