"""Repository on real files: put/has/get/flush, dedupe, sealing, durability, errors, a second view."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opensmc.chunkstore.backend import LocalBackend
from opensmc.chunkstore.packs import parse_index, parse_pack
from opensmc.chunkstore.repository import BlobNotFound, Repository, StoreError
from tests.integration.chunkstore.support import CHUNK, PACK4, FailingBackend, blob, h


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(tmp_path / "store")


def test_config_written_once_and_checked(backend: LocalBackend) -> None:
    Repository(backend, chunk_size=4096)
    doc = json.loads(backend.read("config"))
    assert doc == {"format": "opensmc-chunkstore", "version": 1, "chunk_size": 4096, "hash": "xxh3-128"}
    assert Repository(backend, chunk_size=CHUNK).chunk_size == 4096  # the store's, not the caller's
    backend.write("config", json.dumps({**doc, "version": 2}).encode())
    with pytest.raises(StoreError, match="version 2"):
        Repository(backend)


def test_put_has_get_flush(backend: LocalBackend) -> None:
    repo = Repository(backend)
    a, b = blob(1), blob(2, 1000)
    assert not repo.has(h(a))
    seq = repo.put(h(a), a)
    assert seq == 1 and repo.has(h(a))
    assert repo.put(h(b), b) == 1  # same open pack
    assert repo.durable_seq == 0
    assert backend.list("data/") == []  # nothing written before the pack is sealed
    assert repo.flush() == 1 == repo.durable_seq
    assert repo.get(h(a)) == a and repo.get(h(b)) == b
    assert len(repo.packs()) == 1 and len(backend.list("data/")) == 1
    assert repo.put(h(a), a) == 0  # durable already
    assert repo.flush() == 1  # nothing open: no new pack
    assert len(repo.packs()) == 1
    with pytest.raises(BlobNotFound):
        repo.get(h(b"missing"))


def test_dedupe_stores_once(backend: LocalBackend) -> None:
    repo = Repository(backend)
    a = blob(7)
    assert repo.put(h(a), a) == repo.put(h(a), a) == 1  # pending: the same seq
    repo.flush()
    assert repo.put(h(a), memoryview(a)) == 0
    repo.flush()
    (pack,) = repo.packs()
    entries = parse_index(backend.read(f"index/{pack}"))
    assert [e.hash for e in entries] == [h(a)]
    assert repo.blob_count() == 1


def test_sealing_at_pack_size_and_durable_seq(backend: LocalBackend) -> None:
    repo = Repository(backend, pack_size=PACK4)
    seqs = [repo.put(h(blob(i)), blob(i)) for i in range(10)]
    assert seqs == [1] * 4 + [2] * 4 + [3] * 2
    assert repo.wait_durable(2)  # the first two packs were sealed and go out in the background
    assert repo.durable_seq >= 2
    assert len(repo.packs()) == 2
    assert repo.flush() == 3
    packs = repo.packs()
    assert sorted(len(parse_index(backend.read(f"index/{p}"))) for p in packs) == [2, 4, 4]
    for i in range(10):
        assert repo.get(h(blob(i))) == blob(i)
    # every pack object is the hash of its bytes, and lives under data/<first two hex digits>/
    assert sorted(backend.list("data/")) == sorted(f"data/{p[:2]}/{p}" for p in packs)


def test_compressed_blobs_read_back(backend: LocalBackend) -> None:
    repo = Repository(backend)
    sparse = bytes(8192) + blob(3, 8192)
    repo.put(h(sparse), sparse, compress=True)
    repo.flush()
    (pack,) = repo.packs()
    (e,) = parse_index(backend.read(f"index/{pack}"))
    assert e.codec == 1 and e.stored_length < len(sparse)
    assert Repository(backend).get(h(sparse)) == sparse


def test_second_repository_sees_blobs_after_flush(backend: LocalBackend) -> None:
    one = Repository(backend)
    two = Repository(backend)
    a = blob(11)
    one.put(h(a), a)
    assert not two.has(h(a))
    with pytest.raises(BlobNotFound):
        two.get(h(a))  # not flushed yet: nowhere
    one.flush()
    assert not two.has(h(a))  # has() does not look at the backend ...
    assert two.get(h(a)) == a  # ... a miss in get() reloads
    assert two.has(h(a))
    assert two.put(h(a), a) == 0


@pytest.mark.timeout(60)
def test_writer_error_surfaces_on_next_put(tmp_path: Path) -> None:
    backend = FailingBackend(tmp_path / "s")
    repo = Repository(backend, pack_size=PACK4)
    backend.full = True
    for i in range(4):
        assert repo.put(h(blob(i)), blob(i)) == 1  # the 4th seals the pack: the writer fails
    assert repo.wait_durable(1)  # returns because of the error ...
    assert repo.durable_seq == 0  # ... not because the pack is durable
    with pytest.raises(StoreError, match="No space left"):
        repo.put(h(blob(9)), blob(9))
    assert _spools(backend.root) == []  # the lost pack's file is gone too
    for i in range(4):  # nothing is claimed
        assert not repo.has(h(blob(i)))
        with pytest.raises(BlobNotFound):
            repo.get(h(blob(i)))
    assert backend.list("") == ["config"]
    # the store works again once there is room
    backend.full = False
    seq = repo.put(h(blob(0)), blob(0))
    assert seq >= 1
    assert repo.flush() >= seq
    assert Repository(backend).get(h(blob(0))) == blob(0)


@pytest.mark.timeout(60)
def test_writer_error_surfaces_on_flush_and_index_write_failure(tmp_path: Path) -> None:
    backend = FailingBackend(tmp_path / "s", fail_prefix="index/")
    repo = Repository(backend)
    a = blob(5)
    repo.put(h(a), a)
    backend.full = True
    with pytest.raises(StoreError):
        repo.flush()
    assert repo.durable_seq == 0 and not repo.has(h(a))
    assert backend.list("index/") == []
    # the pack without an index is not a blob anyone can dedupe against or read
    assert Repository(backend).blob_count() == 0
    backend.full = False
    repo.put(h(a), a)
    repo.flush()
    assert Repository(backend).get(h(a)) == a


@pytest.mark.timeout(60)
def test_lost_packs_never_count_as_durable(tmp_path: Path) -> None:
    """After a failed pack, a later durable pack must not make the lost one look durable."""
    backend = FailingBackend(tmp_path / "s")
    repo = Repository(backend)
    a, b = blob(1), blob(2)
    seq_a = repo.put(h(a), a)
    backend.full = True
    with pytest.raises(StoreError):
        repo.flush()
    backend.full = False
    seq_b = repo.put(h(b), b)
    repo.flush()
    assert repo.durable_seq >= seq_b
    assert repo.lost(seq_a)
    assert not repo.lost(seq_b)
    assert not repo.lost(0)


@settings(deadline=None, max_examples=25)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.integers(0, 30), st.booleans()),
            st.tuples(st.just("flush"), st.just(0), st.just(False)),
            st.tuples(st.just("get"), st.integers(0, 30), st.just(False)),
            st.tuples(st.just("reopen"), st.just(0), st.just(False)),
        ),
        max_size=40,
    )
)
def test_random_sequences_against_a_model(ops: list[tuple[str, int, bool]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend = LocalBackend(Path(tmp) / "s")
        repo = Repository(backend, pack_size=PACK4)
        model: dict[bytes, bytes] = {}  # what was put
        durable: set[bytes] = set()  # what was put before the last flush
        for op, n, compress in ops:
            data = blob(n, 1000 + 500 * n) if n % 3 else bytes(2000) + blob(n, 2000)
            key = h(data)
            if op == "put":
                seq = repo.put(key, data, compress=compress)
                if key in durable:
                    assert seq == 0
                elif key not in model:
                    assert seq > repo.durable_seq
                model[key] = data
            elif op == "flush":
                assert repo.flush() == repo.durable_seq
                durable = set(model)
            elif op == "get":
                if key in model:
                    repo.flush()
                    durable = set(model)
                    assert repo.get(key) == data
                else:
                    with pytest.raises(BlobNotFound):
                        repo.get(key)
            else:
                repo.flush()
                durable = set(model)
                repo = Repository(backend, pack_size=PACK4)
                assert all(repo.has(k) for k in model)
        repo.flush()
        fresh = Repository(backend)
        assert fresh.blob_count() == len(model)
        for key, data in model.items():
            assert fresh.get(key) == data


def _spools(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "data").glob(".spool-*"))


@pytest.mark.timeout(60)
def test_a_local_pack_is_written_into_its_file_as_it_fills(backend: LocalBackend) -> None:
    repo = Repository(backend, pack_size=PACK4)
    for i in range(3):
        repo.put(h(blob(i)), blob(i))
    # three blobs in the open pack: already in its (hidden) file, none in memory
    (spool,) = _spools(backend.root)
    assert (backend.root / "data" / spool).stat().st_size == 8 + 3 * (28 + CHUNK)
    assert backend.list("data/") == []
    repo.put(h(blob(3)), blob(3))  # fills the pack
    repo.flush()
    assert _spools(backend.root) == []
    (pack,) = backend.list("data/")
    assert parse_pack(backend.read(pack), pack)[0].hash == h(blob(0))
    assert [Repository(backend).get(h(blob(i))) for i in range(4)] == [blob(i) for i in range(4)]


@pytest.mark.timeout(60)
def test_a_full_disk_while_a_pack_fills_loses_that_pack_only(tmp_path: Path) -> None:
    backend = FailingBackend(tmp_path / "s")
    repo = Repository(backend, pack_size=PACK4)
    for i in range(4):  # the first pack, sealed and written
        repo.put(h(blob(i)), blob(i))
    assert repo.wait_durable(1, timeout=30) and repo.durable_seq == 1
    seq = repo.put(h(blob(4)), blob(4))  # in the open pack's file
    backend.full_on_append = True
    with pytest.raises(StoreError, match="No space left"):
        repo.put(h(blob(5)), blob(5))
    assert repo.lost(seq) and not repo.has(h(blob(4))) and not repo.has(h(blob(5)))
    assert _spools(backend.root) == []
    backend.full_on_append = False
    assert repo.flush() >= 1 and not repo.lost(1)
    new = repo.put(h(blob(4)), blob(4))
    assert new > seq and repo.flush() >= new
    assert Repository(backend).get(h(blob(4))) == blob(4)
    assert Repository(backend).blob_count() == 5


def test_spools_of_dead_processes_are_removed(backend: LocalBackend) -> None:
    repo = Repository(backend)
    repo.put(h(blob(1)), blob(1))
    (mine,) = _spools(backend.root)
    host = mine.removeprefix(".spool-").rsplit("-", 2)[0]
    dead = backend.root / "data" / f".spool-{host}-999999999-0.tmp"
    other_host = backend.root / "data" / ".spool-elsewhere-999999999-0.tmp"
    dead.write_bytes(b"x")
    other_host.write_bytes(b"x")
    fresh = LocalBackend(backend.root)
    Repository(fresh).put(h(blob(2)), blob(2))
    assert not dead.exists() and other_host.exists()
    assert mine in _spools(backend.root)  # a live process's pack is left alone


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 12), st.booleans()), min_size=1, max_size=12),  # frames of (blob, compress)
        max_size=8,
    ),
    st.sets(st.integers(0, 12), max_size=4),  # blobs made durable before the frames
)
def test_put_many_against_put(frames: list[list[tuple[int, bool]]], before: set[int]) -> None:
    """A frame's blobs in one call: as many single puts would be, a blob met twice stored once."""
    with tempfile.TemporaryDirectory() as tmp:
        backend = LocalBackend(Path(tmp) / "s")
        repo = Repository(backend, pack_size=PACK4)  # four blobs a pack: frames cross pack boundaries
        data = {n: blob(n) if n % 3 else bytes(CHUNK // 2) + blob(n, CHUNK // 2) for n in range(13)}
        for n in sorted(before):
            repo.put(h(data[n]), data[n])
        repo.flush()
        stored: set[int] = set(before)
        for frame in frames:
            durable = repo.durable_seq
            seqs = repo.put_many([(h(data[n]), memoryview(data[n]), c) for n, c in frame])
            assert len(seqs) == len(frame)
            firsts: list[int] = []
            for i, ((n, _c), seq) in enumerate(zip(frame, seqs, strict=True)):
                if n in before:
                    assert seq == 0  # durable already: not stored again
                elif n not in stored:  # new: in a pack not durable before the call
                    assert seq > durable
                    if all(m != n for m, _ in frame[:i]):
                        firsts.append(seq)
                # (a blob of an earlier frame: its pack's seq, or 0 once that pack is durable)
                assert all(s == seq for (m, _), s in zip(frame, seqs, strict=True) if m == n)  # one blob, one seq
            assert firsts == sorted(firsts)  # new blobs fill the packs in order
            stored |= {n for n, _ in frame}
        repo.flush()
        fresh = Repository(backend)
        assert fresh.blob_count() == len(stored)  # every blob once, whatever the repeats
        for n in stored:
            assert fresh.get(h(data[n])) == data[n]
        packs = [parse_index(backend.read(f"index/{p}")) for p in fresh.packs()]
        assert sum(len(entries) for entries in packs) == len(stored)
