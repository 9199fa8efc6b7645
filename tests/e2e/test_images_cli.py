"""`opensmc image …` against a real server after a real agent migration, over HTTP and with --data-dir."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import OPENSMC, ServerProcess, clean_env, start_server, stop

pytestmark = pytest.mark.e2e
MiB = 1 << 20


@dataclass
class Migrated:
    server: ServerProcess
    disk: Path
    image_id: str
    tmp: Path

    def image(self, *args: str, local: bool = False) -> subprocess.CompletedProcess[str]:
        where = ["--data-dir", str(self.server.data_dir)] if local else [
            "--credentials", str(self.server.data_dir / "admin-credentials.json")
        ]  # fmt: skip
        return subprocess.run(
            [*OPENSMC, "image", *args, *where], capture_output=True, text=True, timeout=120, env=clean_env()
        )


def _wait(check: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Migrated]:
    tmp = tmp_path_factory.mktemp("images-cli")
    disk = tmp / "disk.img"
    with disk.open("wb") as f:  # 48 MiB, data in a few places, holes elsewhere
        f.truncate(48 * MiB)
        for at in (0, 5 * MiB + 12345, 20 * MiB, 48 * MiB - 70000):
            f.seek(at)
            f.write(os.urandom(70000 if at > 40 * MiB else MiB))
    server = start_server(tmp / "data", "--heartbeat-rate", "1")
    agent = None
    try:
        token = server.call_json("CreateAccessToken", "--Name", "images")
        state = tmp / "agent-state"
        agent = subprocess.Popen(
            [*OPENSMC, "agent", "run", "--server", server.endpoint, "--token-id", str(token["AccessTokenId"]),
             "--token-code", str(token["AccessTokenCode"]), "--disk", str(disk), "--state-dir", str(state)],
            stdout=(tmp / "agent.log").open("a"), stderr=subprocess.STDOUT, text=True, env=clean_env(),
        )  # fmt: skip

        def source() -> str | None:
            found: Any = server.call_json("DescribeSourceServers")["SourceServers"]
            for s in found["SourceServer"]:
                if s["State"] == "Available":
                    return str(s["SourceId"])
            return None

        source_id = _wait(source, "the source to be Available")
        job_id = str(
            server.call_json("CreateReplicationJob", "--RegionId", "local", "--SourceId", source_id,
                             "--Name", "cli", "--ReplicationParameters", '{"checksum":true}')["JobId"]
        )  # fmt: skip
        server.call("StartReplicationJob", "--JobId", job_id)

        def finished() -> dict[str, Any] | None:
            body: Any = server.call_json("DescribeReplicationJobs", "--JobId.1", job_id)
            job = body["ReplicationJobs"]["ReplicationJob"][0]
            assert job["Status"] not in ("InError", "Expired"), job
            return dict(job) if job["Status"] == "Finished" else None

        job = _wait(finished, "the job to finish")
        yield Migrated(server, disk, str(job["ImageId"]), tmp)
    finally:
        if agent is not None:
            stop(agent)
        stop(server.proc)


def test_list_and_show(migrated: Migrated) -> None:
    for local in (False, True):
        listed = migrated.image("list", "--json", local=local)
        assert listed.returncode == 0, listed.stderr
        (item,) = json.loads(listed.stdout)
        assert item["ImageId"] == migrated.image_id
        assert item["Disks"][0]["Size"] == 48 * MiB
        assert item["ChecksumVerified"] is True
        shown = migrated.image("show", migrated.image_id, "--json", "--chunks", local=local)
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert doc["JobId"] == item["JobId"] and len(doc["Disks"][0]["Chunks"]) == 48 * MiB // 16384
    table = migrated.image("list")
    assert migrated.image_id in table.stdout


@pytest.mark.parametrize("local", [False, True], ids=["http", "data-dir"])
def test_raw_export_is_byte_identical_and_sparse(migrated: Migrated, local: bool) -> None:
    out = migrated.tmp / f"export-{local}.raw"
    result = migrated.image("export", migrated.image_id, "--disk", "0", "--format", "raw", "-o", str(out),
                            local=local)  # fmt: skip
    assert result.returncode == 0, result.stderr
    sha = subprocess.run(["sha256sum", str(migrated.disk)], capture_output=True, text=True).stdout.split()[0]
    assert f"sha256 {sha}" in result.stdout
    # Not a terminal: no bar, one summary line with the bytes, the seconds and the rate.
    size = migrated.disk.stat().st_size
    assert f"export {migrated.image_id} disk 0 (raw): {size} bytes in " in result.stderr, result.stderr
    assert out.read_bytes() == migrated.disk.read_bytes()
    assert out.stat().st_blocks * 512 < 8 * MiB  # ~3.1 MiB of data; the holes stay holes


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
@pytest.mark.parametrize("local", [False, True], ids=["http", "data-dir"])
def test_qcow2_export_converts_back(migrated: Migrated, local: bool) -> None:
    out = migrated.tmp / f"export-{local}.qcow2"
    result = migrated.image("export", migrated.image_id, "--format", "qcow2", "-o", str(out), local=local)
    assert result.returncode == 0, result.stderr
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    assert info["format"] == "qcow2"
    back = migrated.tmp / f"back-{local}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(out), str(back)], check=True)
    assert back.read_bytes() == migrated.disk.read_bytes()


def test_errors_are_plain(migrated: Migrated) -> None:
    missing = migrated.image("show", "m-doesnotexist")
    assert missing.returncode == 1 and "InvalidImageId.NotFound" in missing.stderr
    no_disk = migrated.image("export", migrated.image_id, "--disk", "3", "-o", str(migrated.tmp / "x"))
    assert no_disk.returncode == 1 and "no disk 3" in no_disk.stderr
    no_creds = subprocess.run([*OPENSMC, "image", "list"], capture_output=True, text=True, env=clean_env(),
                              cwd=migrated.tmp)  # fmt: skip
    assert no_creds.returncode == 2 and "AccessKey" in no_creds.stderr


def test_verify_then_tampered_chunk_fails(migrated: Migrated) -> None:  # last: it damages the image
    for local in (False, True):
        ok = migrated.image("verify", migrated.image_id, local=local)
        assert ok.returncode == 0, ok.stderr
    packs = sorted((migrated.server.data_dir / "store" / "data").glob("*/*"))
    victim = packs[len(packs) // 2]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1  # inside some blob's bytes (or its header: either is caught)
    victim.write_bytes(bytes(data))
    for local in (False, True):
        bad = migrated.image("verify", migrated.image_id, local=local)
        assert bad.returncode == 1 and "FAILED" in bad.stdout, (bad.stdout, bad.stderr)
        out = migrated.tmp / f"bad-{local}.raw"
        export = migrated.image("export", migrated.image_id, "-o", str(out), local=local)
        assert export.returncode == 1, export.stdout
        assert not out.exists() and not list(migrated.tmp.glob(".bad-*"))
    assert "download aborted" in migrated.server.log.read_text()
