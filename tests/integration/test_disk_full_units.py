"""A full disk, piece by piece: the receiver's refusal, and the database on a full filesystem.

The whole story (a server on a small tmpfs, SQLite and PostgreSQL) is
``tests/e2e/test_disk_full.py``; these pin each piece down cheaply.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from opensmc.agent.uploader import HttpSender, ReceiverError
from opensmc.chunkstore.repository import Repository
from opensmc.chunkstore.staging import StagingIndex
from opensmc.domain.errors import ServerDiskFull
from opensmc.receiver.serve import ReceiverThread
from opensmc.receiver.space import SpaceGuard
from opensmc.store.db import Database, sqlite_url
from opensmc.wire.frames import encode_frame
from tests.integration.chunkstore.support import FailingBackend

TOKEN = "t"
VOLUME = "v-full"
SIZE = 4 << 20


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _receiver(
    tmp_path: Path, repo: Repository, space: SpaceGuard | None, calls: list[tuple[str, str]]
) -> ReceiverThread:
    (tmp_path / "volumes").mkdir(exist_ok=True)
    StagingIndex.create(tmp_path / "volumes" / f"{VOLUME}.fidx", SIZE, 16384).close()
    port = _port()
    thread = ReceiverThread(
        tmp_path / "volumes",
        repo,
        lambda t, v: t == TOKEN,
        "127.0.0.1",
        port,
        space=space,
        on_full=lambda vid, message: calls.append((vid, message)),
    )
    thread.start()
    return thread


def test_a_write_that_meets_a_full_disk_is_507_disk_full(tmp_path: Path) -> None:
    backend = FailingBackend(tmp_path / "store")
    calls: list[tuple[str, str]] = []
    receiver = _receiver(tmp_path, Repository(backend), None, calls)
    try:
        backend.full = True
        with HttpSender(f"http://127.0.0.1:{receiver.port}", VOLUME, TOKEN) as http:
            http.send_batch([encode_frame(0, os.urandom(1 << 20), 0)])  # held in the open pack
            with pytest.raises(ReceiverError) as err:
                http.flush()  # the pack's write meets ENOSPC
        assert err.value.status == 507 and err.value.code == "Receiver.DiskFull", err.value
        assert "The server's disk is full" in err.value.message and "still needs up to 4.0 MiB" in err.value.message
        assert calls and calls[0][0] == VOLUME and calls[0][1] == err.value.message
    finally:
        receiver.stop()


def test_below_the_reserve_nothing_is_written(tmp_path: Path) -> None:
    repo = Repository(FailingBackend(tmp_path / "store"))
    calls: list[tuple[str, str]] = []
    receiver = _receiver(tmp_path, repo, SpaceGuard([tmp_path / "store"], reserve=1 << 62), calls)
    try:
        with HttpSender(f"http://127.0.0.1:{receiver.port}", VOLUME, TOKEN) as http:
            with pytest.raises(ReceiverError) as err:
                http.send_batch([encode_frame(0, os.urandom(65536), 0)])
            assert err.value.status == 507 and err.value.code == "Receiver.DiskFull"
            assert "keeps" in err.value.message and "free at least" in err.value.message, err.value.message
            _cs, held = http.fetch_hashes()  # reads need no space
        assert held.window(0, SIZE // 16384) == {}
        assert repo.blob_count() == 0 and len(calls) == 1
    finally:
        receiver.stop()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "small"
    root.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def test_sqlite_on_a_full_disk_reads_and_refuses_writes_clearly(small_fs: Path) -> None:
    db = Database(sqlite_url(small_fs / "opensmc.db"))
    try:
        with db.begin() as conn:
            conn.execute(text("CREATE TABLE t (v BLOB)"))
            conn.execute(text("INSERT INTO t VALUES (x'01')"))
        with (small_fs / "filler").open("wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass  # the disk is full
        db.engine.dispose()  # every pooled connection gone: the next read opens a new one
        for _ in range(3):
            with db.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 1
        with pytest.raises(ServerDiskFull) as err, db.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (randomblob(1000000))"))
        assert err.value.http_status == 503 and err.value.code == "Server.DiskFull"
        (small_fs / "filler").unlink()
        with db.begin() as conn:  # space freed: writes work again
            conn.execute(text("INSERT INTO t VALUES (randomblob(1000))"))
    finally:
        db.dispose()
