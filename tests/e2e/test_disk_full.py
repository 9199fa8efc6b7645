"""The server's disk fills up: runs are refused or stopped with a clear code, the API keeps answering.

The server's data dir is a small tmpfs (``mount -t tmpfs -o size=…``, as root);
the database is SQLite inside it, or PostgreSQL (whose own data stays on its
disk). A filler file takes the free space away and gives it back:

1. too little room before the run: the job turns InError
   ``Server.InsufficientDiskSpace``, saying how much more is needed;
2. the disk fills up mid-run: InError ``Receiver.DiskFull``, saying how much
   this disk still needs (not a bare 500, not SourceServer.Offline);
3. the disk at 100 %: reads still answer, a write answers 200 or 503
   ``Server.DiskFull``, never 500;
4. space freed: StartReplicationJob resumes and the image is byte-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url, text

from opensmc.store.db import normalize_url
from tests.conftest import PG_URL, _pg_available
from tests.e2e.conftest import ServerProcess
from tests.e2e.disks import MiB, sha256_file
from tests.e2e.flows import (
    Agent,
    api,
    create_job,
    describe,
    export,
    register,
    start_migration_server,
    stop,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.e2e

TMPFS = 200 * MiB
RESERVE_MIB = 48
DISK = 64 * MiB  # random bytes: nothing compresses or deduplicates, the worst case is the real need


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Filler:
    """A file on the tmpfs that takes its free space away (down to ``leave`` bytes) and gives it back."""

    def __init__(self, root: Path) -> None:
        self.path = root / "filler"

    def leave(self, leave: int) -> None:
        root = self.path.parent
        with self.path.open("ab", buffering=0) as f:
            try:
                while free_bytes(root) > leave:
                    f.write(b"\xa5" * min(MiB, max(free_bytes(root) - leave, 4096)))
            except OSError:
                pass  # full: that is what leave=0 asks for

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS},mode=0700", "tmpfs", str(root)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> Iterator[tuple[str, ...]]:
    if request.param == "sqlite":
        yield ()
        return
    if not _pg_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
    admin = create_engine(normalize_url(PG_URL), isolation_level="AUTOCOMMIT")
    name = f"opensmc_full_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield ("--database", make_url(normalize_url(PG_URL)).set(database=name).render_as_string(hide_password=False))
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def status_info(job: dict[str, Any]) -> dict[str, str]:
    return dict(json.loads(job["StatusInfo"]))


def test_disk_full_on_the_server(tmp_path: Path, tmpfs: Path, database: tuple[str, ...]) -> None:
    disk = tmp_path / "sys.img"
    disk.write_bytes(os.urandom(DISK))
    sha = sha256_file(disk)
    server: ServerProcess = start_migration_server(tmpfs, "--disk-reserve", str(RESERVE_MIB), *database)
    agent: Agent | None = None
    filler = Filler(tmpfs)
    try:
        agent, source_id = register(server, [disk], tmp_path / "agent")
        job_id = create_job(
            server, source_id, "full", "--ReplicationParameters", json.dumps({"bandwidth_limit": 40})
        )

        # 1. Less room than the run may need: refused before Preparing hands it out.
        filler.leave((RESERVE_MIB + 40) * MiB)
        server.call_json("StartReplicationJob", "--JobId", job_id)
        job = wait_status(server, job_id, "InError", timeout=30)
        assert job["ErrorCode"] == "Server.InsufficientDiskSpace", job
        info = status_info(job)
        assert "64.0 MiB" in info["error_msg"] and "Free at least" in info["error_msg"], info

        # 2. Room at the start, the disk fills up during the run: InError Receiver.DiskFull.
        filler.release()
        server.call_json("StartReplicationJob", "--JobId", job_id)
        job = wait_status(server, job_id, "Running", "Syncing", timeout=30)
        staged = tmpfs / "data" / "store"
        wait_for(lambda: sum(f.stat().st_size for f in staged.rglob("*") if f.is_file()) > 8 * MiB, 60, "data")
        filler.leave((RESERVE_MIB - 20) * MiB)
        job = wait_status(server, job_id, "InError", timeout=60)
        assert job["ErrorCode"] == "Receiver.DiskFull", job
        message = status_info(job)["error_msg"]
        assert "The server's disk is full" in message and "still needs up to" in message, message
        assert "StartReplicationJob" in message, message

        # 3. The disk at 100 %: reads answer, writes answer clearly.
        filler.leave(0)
        for _ in range(3):
            assert describe(server, job_id)["ErrorCode"] == "Receiver.DiskFull"
            assert api(server, "DescribeSourceServers")["TotalCount"] == 1
        written = server.call("CreateAccessToken", "--Name", "while-full", check=False)
        if written.returncode != 0:
            assert "Server.DiskFull" in written.stdout + written.stderr, (written.stdout, written.stderr)
        assert "Traceback" not in server.log.read_text()

        # 4. Space freed: the run resumes from what the receiver holds, and the image is the disk.
        filler.release()
        server.call_json("StartReplicationJob", "--JobId", job_id)
        job = wait_status(server, job_id, "Finished", timeout=120)
        assert sha256_file(export(server, str(job["ImageId"]), 0, tmp_path / "exported.img")) == sha
        log = server.log.read_text()
        assert "Traceback" not in log and "InternalError" not in log, log[-3000:]
    finally:
        filler.release()
        if agent is not None:
            agent.stop()
        stop(server.proc)

