"""StagingIndex on real files: write/zero/hashes/checkpoint and the crash rule (never name a non-durable blob)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from opensmc.chunkstore.backend import LocalBackend
from opensmc.chunkstore.repository import Repository, StoreError
from opensmc.chunkstore.staging import HEADER_SIZE, Misaligned, OutOfRange, StagingError, StagingIndex
from tests.integration.chunkstore.support import CHUNK, PACK4, FailingBackend, blob, h

ZERO = bytes(16)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository(LocalBackend(tmp_path / "store"))


def on_disk(path: Path) -> dict[int, bytes]:
    """What a process that opens the file after a crash sees."""
    return StagingIndex.read_disk(path).hashes()


def test_create_layout(tmp_path: Path) -> None:
    p = tmp_path / "v.fidx"
    idx = StagingIndex.create(p, 5 * CHUNK + 100, CHUNK)
    idx.close()
    raw = p.read_bytes()
    assert raw[:8] == b"OSMFIDX\x01"
    assert int.from_bytes(raw[8:16], "little") == 5 * CHUNK + 100
    assert int.from_bytes(raw[16:20], "little") == CHUNK
    assert raw[20:64] == bytes(44)
    assert len(raw) == HEADER_SIZE + 6 * 16
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert on_disk(p) == {}


@pytest.mark.parametrize(("size", "chunk"), [(0, CHUNK), (100, 1000), (100, 2048), (100, 8 * 1024 * 1024)])
def test_create_refuses(tmp_path: Path, size: int, chunk: int) -> None:
    with pytest.raises(ValueError):
        StagingIndex.create(tmp_path / "x.fidx", size, chunk)


def test_open_refuses_other_files(tmp_path: Path) -> None:
    p = tmp_path / "x.fidx"
    p.write_bytes(b"short")
    with pytest.raises(StagingError, match="too short"):
        StagingIndex.open(p)
    p.write_bytes(b"NOTMAGIC" + bytes(56))
    with pytest.raises(StagingError, match="format"):
        StagingIndex.open(p)
    StagingIndex.create(p, 4 * CHUNK, CHUNK).close()
    with p.open("ab") as f:
        f.write(b"x")
    with pytest.raises(StagingError, match="expected"):
        StagingIndex.open(p)


def test_write_zero_hashes_checkpoint(tmp_path: Path, repo: Repository) -> None:
    p = tmp_path / "v.fidx"
    size = 4 * CHUNK + 1000
    idx = StagingIndex.create(p, size, CHUNK)
    a, b, tail = blob(1), blob(2), blob(3, 1000)
    idx.write(repo, 0, a + b)
    idx.write(repo, 2 * CHUNK, bytes(CHUNK))  # zeros are not blobs
    idx.write(repo, 4 * CHUNK, tail)  # the short last chunk
    assert idx.hashes() == {0: h(a), 1: h(b), 4: h(tail)}
    assert on_disk(p) == {}  # none of those blobs is durable yet
    idx.checkpoint(repo)
    assert on_disk(p) == {0: h(a), 1: h(b), 4: h(tail)}
    assert repo.blob_count() == 3
    idx.zero(repo, 0, CHUNK)
    assert idx.hashes() == {1: h(b), 4: h(tail)}
    assert on_disk(p) == {1: h(b), 4: h(tail)}  # zeroing needs no blob: straight into the file
    idx.write(repo, 3 * CHUNK, b)  # a blob durable already: straight into the file too
    assert on_disk(p) == {1: h(b), 3: h(b), 4: h(tail)}
    idx.close(flush=True, repo=repo)
    again = StagingIndex.open(p)
    assert again.hashes() == {1: h(b), 3: h(b), 4: h(tail)}
    assert again.disk().chunks == 5
    again.close()


def test_refused_writes(tmp_path: Path, repo: Repository) -> None:
    idx = StagingIndex.create(tmp_path / "v.fidx", 3 * CHUNK, CHUNK)
    with pytest.raises(OutOfRange):
        idx.write(repo, 2 * CHUNK, blob(1, 2 * CHUNK))
    with pytest.raises(OutOfRange):
        idx.zero(repo, -CHUNK, CHUNK)
    with pytest.raises(Misaligned):
        idx.write(repo, 100, blob(1, CHUNK))
    with pytest.raises(Misaligned):
        idx.write(repo, 0, blob(1, 100))  # ends inside a chunk that is not the last
    assert idx.hashes() == {} and repo.blob_count() == 0 and not repo.has(h(blob(1)))
    idx.close()


def test_crash_rule_pending_entries_not_in_file(tmp_path: Path) -> None:
    repo = Repository(LocalBackend(tmp_path / "s"), pack_size=PACK4)
    p = tmp_path / "v.fidx"
    idx = StagingIndex.create(p, 16 * CHUNK, CHUNK)
    data = [blob(i) for i in range(6)]
    for i, d in enumerate(data):
        idx.write(repo, i * CHUNK, d)
    # the first pack (blobs 0-3) was sealed; once durable, catch_up writes its entries, not the others
    assert repo.wait_durable(1)
    idx.catch_up(repo)
    assert on_disk(p) == {i: h(data[i]) for i in range(4)}
    assert idx.has_pending() and idx.hashes() == {i: h(d) for i, d in enumerate(data)}
    idx.checkpoint(repo)
    assert not idx.has_pending()
    assert on_disk(p) == {i: h(d) for i, d in enumerate(data)}
    idx.close()


def test_pending_entries_dropped_on_close_without_flush(tmp_path: Path, repo: Repository) -> None:
    p = tmp_path / "v.fidx"
    idx = StagingIndex.create(p, 4 * CHUNK, CHUNK)
    idx.write(repo, 0, blob(1))
    idx.close()
    assert on_disk(p) == {}


def test_a_failed_pack_is_never_named_by_the_file(tmp_path: Path) -> None:
    backend = FailingBackend(tmp_path / "s")
    repo = Repository(backend)
    p = tmp_path / "v.fidx"
    idx = StagingIndex.create(p, 4 * CHUNK, CHUNK)
    a, b = blob(1), blob(2)
    idx.write(repo, 0, a)
    backend.full = True
    with pytest.raises(StoreError):
        idx.checkpoint(repo)
    backend.full = False
    idx.write(repo, CHUNK, b)
    with pytest.raises(StoreError, match="1 chunk"):
        idx.checkpoint(repo)
    assert idx.hashes() == {1: h(b)}
    for chunk, digest in on_disk(p).items():
        assert Repository(backend).get(digest) is not None, chunk
    assert on_disk(p) == {1: h(b)}
    idx.close()


def test_two_indexes_on_one_repository_after_a_failed_pack(tmp_path: Path) -> None:
    """The error is reported once, to one writer; the other index must still not name the lost blob."""
    backend = FailingBackend(tmp_path / "s")
    repo = Repository(backend)
    one = StagingIndex.create(tmp_path / "1.fidx", 4 * CHUNK, CHUNK)
    two = StagingIndex.create(tmp_path / "2.fidx", 4 * CHUNK, CHUNK)
    two.write(repo, 0, blob(20))
    backend.full = True
    one.write(repo, 0, blob(10))
    with pytest.raises(StoreError):
        one.checkpoint(repo)
    backend.full = False
    two.write(repo, CHUNK, blob(21))
    with pytest.raises(StoreError, match="1 chunk"):  # two never heard of the error: checkpoint says it
        two.checkpoint(repo)
    assert on_disk(tmp_path / "2.fidx") == {1: h(blob(21))}
    assert two.hashes() == {1: h(blob(21))}  # what the receiver tells the agent it has
    two.checkpoint(repo)  # reported once
    assert not two.has_pending()
    one.close()
    two.close()


CHILD = """
import os, random, sys
from pathlib import Path
import xxhash
from opensmc.chunkstore.backend import LocalBackend
from opensmc.chunkstore.repository import Repository
from opensmc.chunkstore.staging import StagingIndex

root, path = sys.argv[1], Path(sys.argv[2])
chunk = 16384
chunks = 256
repo = Repository(LocalBackend(root), pack_size=8 * chunk)
idx = StagingIndex.create(path, chunks * chunk - 5000, chunk)
rng = random.Random(int(sys.argv[3]))
pool = [os.urandom(chunk) for _ in range(40)]  # repeats: dedupe against pending and durable blobs
step = 0
while True:
    first = rng.randrange(chunks - 4)
    n = rng.randint(1, 4)
    kind = rng.random()
    if kind < 0.1:
        idx.zero(repo, first * chunk, n * chunk)
    else:
        data = b"".join(
            bytes(chunk) if rng.random() < 0.1 else (rng.choice(pool) if rng.random() < 0.5 else os.urandom(chunk))
            for _ in range(n)
        )
        idx.write(repo, first * chunk, data)
    if kind > 0.97:
        idx.checkpoint(repo)
    elif kind > 0.8:
        idx.catch_up(repo)
    step += 1
    if step % 20 == 0:
        print(step, flush=True)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_mid_run_leaves_only_durable_blobs(tmp_path: Path, seed: int) -> None:
    root, path = tmp_path / "store", tmp_path / "v.fidx"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(root), str(path), str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    try:
        for _ in range(5 + 3 * seed):
            assert child.stdout.readline(), "the writer died on its own"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    disk = StagingIndex.read_disk(path)
    found = disk.hashes()
    assert found, "the run wrote nothing durable before the kill: the test proves nothing"
    repo = Repository(LocalBackend(root))
    for chunk, digest in found.items():
        data = repo.get(digest)  # raises if the blob is not in the store
        assert xxhash.xxh3_128_digest(data) == digest, chunk
        assert len(data) == disk.chunk_length(chunk)
    # the file opens for writing again, and goes on
    idx = StagingIndex.open(path)
    idx.write(repo, 0, blob(1))
    idx.checkpoint(repo)
    assert idx.hashes()[0] == h(blob(1))
    idx.close()


def test_disk_digests_are_a_copy(tmp_path: Path, repo: Repository) -> None:
    idx = StagingIndex.create(tmp_path / "v.fidx", 2 * CHUNK, CHUNK)
    d = idx.disk()
    idx.write(repo, 0, blob(1))
    idx.checkpoint(repo)
    assert not d.digests.any() and np.array_equal(idx.disk().digests[0], np.frombuffer(h(blob(1)), np.uint8))
    idx.close()


@settings(deadline=None, max_examples=30)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.integers(0, 9), st.lists(st.integers(0, 12), min_size=1, max_size=3)),
            st.tuples(st.just("zero"), st.integers(0, 9), st.lists(st.just(0), min_size=1, max_size=3)),
            st.tuples(st.sampled_from(["checkpoint", "catch_up", "reopen"]), st.just(0), st.just([0])),
        ),
        max_size=30,
    )
)
def test_random_writes_against_a_model(ops: list[tuple[str, int, list[int]]]) -> None:
    chunks = 12
    with tempfile.TemporaryDirectory() as tmp:
        backend = LocalBackend(Path(tmp) / "s")
        repo = Repository(backend, pack_size=PACK4)
        p = Path(tmp) / "v.fidx"
        idx = StagingIndex.create(p, chunks * CHUNK - 3000, CHUNK)
        model: dict[int, bytes] = {}  # chunk -> digest, as the receiver holds it
        ever: dict[int, set[bytes]] = {}  # every digest a chunk was given

        def content(n: int, chunk: int) -> bytes:
            length = CHUNK if chunk < chunks - 1 else CHUNK - 3000
            return bytes(length) if n == 0 else blob(n, length)

        for op, first, values in ops:
            values = values[: chunks - first]
            if op == "write" and values:
                datas = [content(n, first + k) for k, n in enumerate(values)]
                idx.write(repo, first * CHUNK, b"".join(datas))
                for k, d in enumerate(datas):
                    if any(d):
                        model[first + k] = h(d)
                        ever.setdefault(first + k, set()).add(h(d))
                    else:
                        model.pop(first + k, None)
            elif op == "zero" and values:
                length = min(len(values) * CHUNK, idx.size - first * CHUNK)
                idx.zero(repo, first * CHUNK, length)
                for k in range(len(values)):
                    model.pop(first + k, None)
            elif op == "checkpoint":
                idx.checkpoint(repo)
                assert on_disk(p) == model
            elif op == "catch_up":
                idx.catch_up(repo)
            elif op == "reopen":
                idx.checkpoint(repo)
                idx.close()
                idx = StagingIndex.open(p)
            assert idx.hashes() == model
            # the crash rule, at every step: the file names only durable blobs this chunk was given
            fresh = Repository(backend)
            for chunk, digest in on_disk(p).items():
                assert digest in ever[chunk]
                assert h(fresh.get(digest)) == digest
        idx.checkpoint(repo)
        assert on_disk(p) == model
        idx.close()
