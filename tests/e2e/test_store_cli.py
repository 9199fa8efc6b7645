"""`opensmc store check|gc` on a real server's data dir: a clean store passes, a damaged one fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import OPENSMC, clean_env
from tests.e2e.disks import MiB, build_disk, require_tools
from tests.e2e.flows import create_job, register, start_migration_server, stop, wait_status

pytestmark = pytest.mark.e2e


def store(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OPENSMC, "store", *args], capture_output=True, text=True, env=clean_env(), timeout=120)


def test_check_and_gc(tmp_path: Path) -> None:
    require_tools()
    disk = build_disk(tmp_path / "sys.img", 32 * MiB, parts=1, seed=31, random_mib=8)
    server = start_migration_server(tmp_path)
    agent = None
    try:
        agent, source_id = register(server, [disk.path], tmp_path / "agent")
        job_id = create_job(server, source_id, "store-cli")
        server.call_json("StartReplicationJob", "--JobId", job_id)
        wait_status(server, job_id, "Finished", timeout=60)
        data = str(server.data_dir)
        ok = store("check", "--data-dir", data)
        assert ok.returncode == 0 and "1 image(s)" in ok.stdout and "no errors" in ok.stdout, ok
        gc = store("gc", "--data-dir", data)
        assert gc.returncode == 0 and "0 pack(s) deleted" in gc.stdout, gc

        [pack, *_] = sorted((server.data_dir / "store" / "data").glob("*/*"))
        raw = bytearray(pack.read_bytes())
        raw[len(raw) // 2] ^= 1
        pack.write_bytes(bytes(raw))
        bad = store("check", "--data-dir", data)
        assert bad.returncode == 1 and "FAILED" in bad.stdout and pack.name in bad.stdout, bad
        quick = store("check", "--data-dir", data, "--no-read-data")  # indexes only: cannot see the flip
        assert quick.returncode == 0, quick
        missing = store("check", "--data-dir", str(tmp_path / "nowhere"))
        assert missing.returncode == 2 and "holds no image store" in missing.stderr
        assert "Traceback" not in bad.stderr + missing.stderr
    finally:
        if agent:
            agent.stop()
        stop(server.proc)
