"""OS adaptation's bookkeeping on a real chunk store: the changed regions become blobs, the rest is shared;
disks without a bootloader are recognised from their first chunks (no appliance is started for them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xxhash

from opensmc.chunkstore.snapshots import DiskIndex
from opensmc.images.adaptation import Adaptation, harvest, nothing_to_boot
from opensmc.images.store import ImageStore

CS = 16384


def _disk(store: ImageStore, chunks: list[bytes | None]) -> DiskIndex:
    digests = np.zeros((len(chunks), 16), dtype=np.uint8)
    with store.repo.session():
        for i, data in enumerate(chunks):
            if data is not None:
                h = xxhash.xxh3_128_digest(data)
                store.repo.put(h, data)
                digests[i] = np.frombuffer(h, dtype=np.uint8)
        store.repo.flush()
    return DiskIndex(len(chunks) * CS, CS, digests)


def test_harvest_replaces_only_the_chunks_the_overlay_touched(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    base = _disk(store, [b"a" * CS, b"b" * CS, None, b"d" * CS, b"e" * CS])
    work = tmp_path / "work"
    work.mkdir()
    changed = bytearray(5 * CS)
    changed[CS + 100 : CS + 200] = b"X" * 100  # part of chunk 1: merged with the source's bytes
    changed[2 * CS : 3 * CS] = b"Y" * CS  # all of chunk 2, a hole before
    (work / "changed.raw").write_bytes(bytes(changed))
    result = Adaptation(adapted=True, work=work)
    # chunk 1 partly; chunk 2 whole; chunk 3 written with zeros (a discard); chunk 4 written with its own bytes
    result.extents = [(CS + 100, 100, False), (2 * CS, CS, False), (3 * CS, CS, True)]
    with store.repo.session():
        new = harvest(store, base, result)
    assert new.size == base.size and new.sha256 is None
    assert new.hash_at(0) == base.hash_at(0) and new.hash_at(4) == base.hash_at(4)  # untouched: shared
    assert store.read_chunk(new.hash_at(1)) == b"b" * 100 + b"X" * 100 + b"b" * (CS - 200)  # type: ignore[arg-type]
    assert store.read_chunk(new.hash_at(2)) == b"Y" * CS  # type: ignore[arg-type]
    assert new.hash_at(3) is None  # zeros name no blob
    assert result.changed_chunks == 3
    assert store.read_chunk(base.hash_at(1) or b"") == b"b" * CS  # the source is intact


def test_nothing_to_boot_looks_for_boot_code_or_an_efi_system_partition(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    empty = _disk(store, [None, None])
    assert nothing_to_boot(store, empty) is not None
    mbr = bytearray(CS)
    mbr[0:3] = b"\xeb\x63\x90"  # GRUB's boot.img starts with a jump
    assert nothing_to_boot(store, _disk(store, [bytes(mbr), None])) is not None  # no boot signature: random data
    mbr[510:512] = b"\x55\xaa"
    assert nothing_to_boot(store, _disk(store, [bytes(mbr), None])) is None
    gpt = bytearray(2 * CS)
    gpt[512:520] = b"EFI PART"
    gpt[512 + 72 : 512 + 80] = (2).to_bytes(8, "little")  # entries at LBA 2
    gpt[512 + 80 : 512 + 84] = (128).to_bytes(4, "little")
    gpt[512 + 84 : 512 + 88] = (128).to_bytes(4, "little")
    linux = bytes.fromhex("af3dc60f838472478e793d69d8477de4")  # a Linux file system partition
    gpt[1024 : 1024 + 16] = linux
    disk = _disk(store, [bytes(gpt[:CS]), bytes(gpt[CS:])])
    assert nothing_to_boot(store, disk) is not None  # GPT without an ESP, no boot code: a data disk
    gpt[1024 + 128 : 1024 + 144] = bytes.fromhex("28732ac11ff8d211ba4b00a0c93ec93b")
    assert nothing_to_boot(store, _disk(store, [bytes(gpt[:CS]), bytes(gpt[CS:])])) is None
