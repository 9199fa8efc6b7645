"""Garbage collection: roots survive, the rest goes, repacking, deferral, and writers that reload."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from opensmc.chunkstore.backend import LocalBackend, LockBusy
from opensmc.chunkstore.gc import collect
from opensmc.chunkstore.packs import parse_index
from opensmc.chunkstore.repository import BlobNotFound, Repository
from opensmc.chunkstore.snapshots import DiskIndex, delete_snapshot, list_snapshots, save_snapshot
from opensmc.chunkstore.staging import StagingIndex
from tests.integration.chunkstore.support import CHUNK, blob, h


def disk_of(*blobs: bytes) -> DiskIndex:
    digests = np.array([np.frombuffer(h(b), np.uint8) for b in blobs] + [np.zeros(16, np.uint8)], np.uint8)
    return DiskIndex(len(digests) * CHUNK, CHUNK, digests.reshape(-1, 16))


def pack_of(repo: Repository, data: list[bytes]) -> str:
    """Write ``data`` as one pack of its own; its name."""
    before = set(repo.packs())
    for d in data:
        repo.put(h(d), d)
    repo.flush()
    (new,) = set(repo.packs()) - before
    return new


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(tmp_path / "store")


def test_roots_survive_the_rest_goes(backend: LocalBackend) -> None:
    repo = Repository(backend)
    b = [blob(i) for i in range(12)]
    p_small_dead = pack_of(repo, b[0:4])  # 1 of 4 dead: kept as it is
    p_mostly_dead = pack_of(repo, b[4:8])  # 3 of 4 dead: repacked
    p_half_staged = pack_of(repo, b[8:10])  # 1 of 2 dead (the live one named by a staging index): repacked
    p_dead = pack_of(repo, b[10:12])  # all dead: deleted
    save_snapshot(backend, "img-1", [disk_of(b[0], b[1], b[2]), disk_of(b[4])])
    staging = [disk_of(b[8])]
    generation = int(backend.read("generation")) if backend.exists("generation") else 0

    report = collect(repo, staging, repack_ratio=0.3)

    assert not report.deferred and report.errors == []
    assert (report.packs_deleted, report.packs_repacked) == (1, 2)
    assert report.blobs_freed == 3 + 1 + 2
    assert report.bytes_freed == 6 * CHUNK
    assert int(backend.read("generation")) == generation + 2  # before the sweep, and after it
    packs = set(repo.packs())
    assert p_small_dead in packs
    assert not packs & {p_mostly_dead, p_half_staged, p_dead}
    assert len(packs) == 3
    assert sorted(n.rpartition("/")[2] for n in backend.list("data/")) == sorted(packs)
    fresh = Repository(backend)
    for i in (0, 1, 2, 3, 4, 8):  # b[3] is dead but its pack was kept
        assert fresh.get(h(b[i])) == b[i]
    for i in (5, 6, 7, 9, 10, 11):
        with pytest.raises(BlobNotFound):
            fresh.get(h(b[i]))
    # the collector's own view was reloaded too
    assert repo.get(h(b[4])) == b[4]
    with pytest.raises(BlobNotFound):
        repo.get(h(b[10]))
    # a second run has nothing left to do but the kept pack's one dead blob
    again = collect(repo, staging, repack_ratio=0.3)
    assert (again.packs_deleted, again.packs_repacked, again.blobs_freed) == (0, 0, 0)


def test_repack_keeps_compression(backend: LocalBackend) -> None:
    repo = Repository(backend)
    sparse = bytes(CHUNK // 2) + blob(1, CHUNK // 2)
    repo.put(h(sparse), sparse, compress=True)
    repo.put(h(blob(2)), blob(2))
    repo.flush()
    collect(repo, [disk_of(sparse)])
    (pack,) = repo.packs()
    (e,) = parse_index(backend.read(f"index/{pack}"))
    assert e.codec == 1 and Repository(backend).get(h(sparse)) == sparse


def test_a_deleted_snapshot_frees_its_blobs(backend: LocalBackend) -> None:
    repo = Repository(backend)
    pack_of(repo, [blob(1), blob(2)])
    save_snapshot(backend, "a", [disk_of(blob(1), blob(2))])
    assert collect(repo, []).blobs_freed == 0
    assert delete_snapshot(backend, "a") and not delete_snapshot(backend, "a")
    assert list_snapshots(backend) == []
    assert collect(repo, []).packs_deleted == 1
    assert repo.packs() == [] and backend.list("data/") == []


def test_nothing_to_do_does_not_bump_generation(backend: LocalBackend) -> None:
    repo = Repository(backend)
    pack_of(repo, [blob(1)])
    save_snapshot(backend, "a", [disk_of(blob(1))])
    report = collect(repo, [])
    assert report.blobs_freed == 0 and not backend.exists("generation")


def test_deferred_while_a_staging_index_has_pending_entries(tmp_path: Path, backend: LocalBackend) -> None:
    repo = Repository(backend)
    pack_of(repo, [blob(99)])  # garbage, to show that nothing is done while deferred
    idx = StagingIndex.create(tmp_path / "v.fidx", 4 * CHUNK, CHUNK)
    idx.write(repo, 0, blob(1))
    assert idx.has_pending()
    gc_repo = Repository(backend)
    report = collect(gc_repo, [])
    assert report.deferred and report.packs_deleted == 0
    assert gc_repo.has(h(blob(99))) and Repository(backend).get(h(blob(99))) == blob(99)
    idx.checkpoint(repo)  # durable and in the file: the index lets go of the lock
    assert not idx.has_pending()
    report = collect(gc_repo, [StagingIndex.read_disk(tmp_path / "v.fidx")])
    assert not report.deferred and report.packs_deleted == 1
    assert Repository(backend).get(h(blob(1))) == blob(1)  # named by the staging index: kept
    idx.close()


def test_deferred_while_a_session_is_open(backend: LocalBackend) -> None:
    repo = Repository(backend)
    pack_of(repo, [blob(1)])
    reader = Repository(backend)
    with reader.session():
        assert collect(repo, []).deferred
        assert reader.get(h(blob(1))) == blob(1)
    assert collect(repo, []).packs_deleted == 1


def test_a_writer_reloads_after_gc_and_stores_again(backend: LocalBackend) -> None:
    writer = Repository(backend)
    a = blob(1)
    with writer.session():
        writer.put(h(a), a)
        writer.flush()
        assert writer.put(h(a), a) == 0
    report = collect(Repository(backend), [])  # nothing names a: gone
    assert report.packs_deleted == 1
    with writer.session():  # sees the new generation and reloads
        assert not writer.has(h(a))
        seq = writer.put(h(a), a)
        assert seq > 0  # not deduplicated against the deleted blob
        assert writer.flush() >= seq
    assert Repository(backend).get(h(a)) == a


def test_a_staging_index_reloads_after_gc(tmp_path: Path, backend: LocalBackend) -> None:
    writer = Repository(backend)
    p = tmp_path / "v.fidx"
    idx = StagingIndex.create(p, 4 * CHUNK, CHUNK)
    a = blob(1)
    idx.write(writer, 0, a)
    idx.checkpoint(writer)
    idx.zero(writer, 0, CHUNK)  # a is named by nothing now
    idx.checkpoint(writer)
    assert collect(Repository(backend), [StagingIndex.read_disk(p)]).packs_deleted == 1
    idx.write(writer, CHUNK, a)  # begins a session: reloads, stores a again
    idx.checkpoint(writer)
    assert StagingIndex.read_disk(p).hashes() == {1: h(a)}
    assert Repository(backend).get(h(a)) == a
    idx.close()


def test_damaged_index_is_reported_and_its_pack_left_alone(backend: LocalBackend) -> None:
    repo = Repository(backend)
    p = pack_of(repo, [blob(1)])
    backend.write(f"index/{p}", b"garbage")
    report = collect(Repository(backend), [])
    assert report.errors and p in report.errors[0]
    assert backend.exists(f"data/{p[:2]}/{p}")


def test_staging_roots_are_read_under_the_exclusive_lock(tmp_path: Path, backend: LocalBackend) -> None:
    """Pass a generator: it is consumed while no run can checkpoint (the shared lock is refused)."""
    repo = Repository(backend)
    pack_of(repo, [blob(1), blob(2)])
    seen: list[bool] = []

    def roots() -> Iterator[DiskIndex]:
        try:
            backend.lock("gc", exclusive=False, blocking=False).release()
            seen.append(False)
        except LockBusy:
            seen.append(True)
        yield disk_of(blob(1))

    report = collect(repo, roots(), repack_ratio=0.9)
    assert seen == [True]
    assert report.packs_repacked == 0 and report.blobs_freed == 0  # 1 of 2 dead, under the ratio
    assert Repository(backend).get(h(blob(1))) == blob(1)


@pytest.mark.parametrize("point", ["gc.marked", "gc.sweeping"])
def test_a_view_loaded_while_gc_sweeps_reloads_before_it_is_trusted(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """A process that opens the store during a collection (no lock is needed to open it) has read
    indexes the sweep then deletes; its next session must reload, or it reads packs that are gone
    (found by tests/e2e/test_phase_kills.py) and, as a writer, would deduplicate against them."""
    import opensmc.chunkstore.gc as gc_module

    repo = Repository(backend)
    b = [blob(i) for i in range(8)]
    pack_of(repo, b[0:4])  # 3 of 4 dead: repacked, its index and pack deleted
    pack_of(repo, b[4:8])  # all dead: deleted
    save_snapshot(backend, "img", [disk_of(b[0])])
    opened: list[Repository] = []

    def open_mid_gc(name: str) -> None:
        if name == point and not opened:
            opened.append(Repository(backend))

    monkeypatch.setattr(gc_module, "crash_point", open_mid_gc)
    report = collect(repo, [], repack_ratio=0.3)
    assert report.packs_repacked == 1 and opened
    (view,) = opened
    with view.session():
        assert view.get(h(b[0])) == b[0]
        assert not view.has(h(b[5]))  # a writer would store it again, not deduplicate


def test_an_interrupted_collection_is_finished_with_a_new_generation(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed mid-sweep, the next collection (even with nothing left to delete) bumps the
    generation, so views opened during the interrupted one reload."""
    import opensmc.chunkstore.gc as gc_module

    repo = Repository(backend)
    pack_of(repo, [blob(1)])
    opened: list[Repository] = []

    class Killed(Exception):
        pass

    def die(name: str) -> None:
        if name == "gc.sweeping":
            opened.append(Repository(backend))
            raise Killed

    monkeypatch.setattr(gc_module, "crash_point", die)
    with pytest.raises(Killed):
        collect(repo, [])
    monkeypatch.setattr(gc_module, "crash_point", lambda name: None)
    generation = int(backend.read("generation"))
    collect(Repository(backend), [])  # nothing left to delete
    assert int(backend.read("generation")) > generation
    (view,) = opened
    with view.session():
        assert not view.has(h(blob(1)))
