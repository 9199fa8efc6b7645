"""check: passes on a good store, reports every kind of damage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opensmc.chunkstore.backend import LocalBackend
from opensmc.chunkstore.check import check
from opensmc.chunkstore.repository import Repository
from opensmc.chunkstore.snapshots import DiskIndex, save_snapshot
from tests.integration.chunkstore.support import CHUNK, PACK4, blob, h


@pytest.fixture
def store(tmp_path: Path) -> tuple[LocalBackend, Repository, list[str]]:
    backend = LocalBackend(tmp_path / "store")
    repo = Repository(backend, pack_size=PACK4)
    data = [blob(i) for i in range(8)] + [bytes(CHUNK // 2) + blob(8, CHUNK // 2)]
    for d in data:
        repo.put(h(d), d, compress=True)
    repo.flush()
    digests = np.array([np.frombuffer(h(d), np.uint8) for d in data] + [np.zeros(16, np.uint8)])
    save_snapshot(backend, "img", [DiskIndex(10 * CHUNK, CHUNK, digests)])
    return backend, repo, repo.packs()


def test_good_store(store: tuple[LocalBackend, Repository, list[str]]) -> None:
    backend, repo, packs = store
    report = check(repo)
    assert report.ok, report.errors
    assert (report.packs, report.blobs, report.snapshots) == (3, 9, 1)
    assert report.bytes_read == sum(backend.size(f"data/{p[:2]}/{p}") for p in packs)
    quick = check(repo, read_data=False)
    assert quick.ok and quick.bytes_read == 0 and quick.blobs == 9


def test_flipped_byte_in_a_pack(store: tuple[LocalBackend, Repository, list[str]]) -> None:
    backend, repo, packs = store
    name = f"data/{packs[0][:2]}/{packs[0]}"
    raw = bytearray(backend.read(name))
    raw[100] ^= 0x40
    backend.write(name, raw)
    report = check(repo)
    assert not report.ok
    assert any(packs[0] in e and "does not match its name" in e for e in report.errors)
    assert any("snapshot img" in e for e in report.errors)  # its blobs are no longer good
    assert check(repo, read_data=False).ok  # the indexes alone cannot see it


def test_missing_pack(store: tuple[LocalBackend, Repository, list[str]]) -> None:
    backend, repo, packs = store
    backend.delete(f"data/{packs[1][:2]}/{packs[1]}")
    report = check(repo)
    assert any(packs[1] in e and "missing" in e for e in report.errors)
    assert any("snapshot img disk 0" in e for e in report.errors)


def test_missing_index_object(store: tuple[LocalBackend, Repository, list[str]]) -> None:
    backend, repo, packs = store
    backend.delete(f"index/{packs[2]}")
    report = check(repo)
    assert any(packs[2] in e and "no index object" in e for e in report.errors)


def test_damaged_index_object(store: tuple[LocalBackend, Repository, list[str]]) -> None:
    backend, repo, packs = store
    raw = bytearray(backend.read(f"index/{packs[0]}"))
    raw[3] ^= 1
    backend.write(f"index/{packs[0]}", raw)
    report = check(repo)
    assert any(f"index {packs[0]}" in e for e in report.errors)


def test_index_object_differing_from_the_pack(store: tuple[LocalBackend, Repository, list[str]]) -> None:
    backend, repo, packs = store
    backend.write(f"index/{packs[0]}", backend.read(f"index/{packs[1]}"))
    report = check(repo)
    assert any(packs[0] in e and "differs" in e for e in report.errors)


def test_snapshot_naming_a_missing_blob(store: tuple[LocalBackend, Repository, list[str]]) -> None:
    backend, repo, _ = store
    digests = np.zeros((3, 16), np.uint8)
    digests[2] = np.frombuffer(h(b"never stored"), np.uint8)
    save_snapshot(backend, "bad", [DiskIndex(3 * CHUNK, CHUNK, digests)])
    report = check(repo)
    assert report.errors == ["snapshot bad disk 0: 1 chunk(s) have no good blob (first at chunk 2)"]


def test_damaged_snapshot(store: tuple[LocalBackend, Repository, list[str]]) -> None:
    backend, repo, _ = store
    raw = bytearray(backend.read("snapshots/img"))
    raw[-1] ^= 1
    backend.write("snapshots/img", raw)
    report = check(repo)
    assert len(report.errors) == 1 and "snapshot img" in report.errors[0]
