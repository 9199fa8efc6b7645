"""The receiver as a process of its own (`--roles receiver`), killed with -9 mid-transfer."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import OPENSMC, clean_env, free_port, start_server, stop
from tests.e2e.disks import MiB, build_disk, require_tools, sha256_file
from tests.e2e.flows import create_job, export, register, staging_bytes, wait_for, wait_status

pytestmark = pytest.mark.e2e


def start_receiver(data_dir: Path, port: int) -> subprocess.Popen[str]:
    log = data_dir.parent / f"receiver-{port}.log"
    proc = subprocess.Popen(
        [
            *OPENSMC,
            "server",
            "--data-dir",
            str(data_dir),
            "--roles",
            "receiver",
            "--receiver-listen",
            f"127.0.0.1:{port}",
        ],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)


def test_separate_receiver_killed_and_restarted(tmp_path: Path) -> None:
    require_tools()
    disk = build_disk(tmp_path / "sys.img", 96 * MiB, label="gpt", parts=2, seed=31)
    rport = free_port()
    data = tmp_path / "data"
    server = start_server(
        data,
        "--roles",
        "api,orchestrator",
        "--receiver-endpoint",
        f"http://127.0.0.1:{rport}",
        "--heartbeat-rate",
        "1",
        "--heartbeat-grace",
        "60",
    )
    receiver = start_receiver(data, rport)
    agent = None
    try:
        agent, source_id = register(server, [disk.path], tmp_path / "agent")
        # ~10 MiB of data at 8 Mbit/s: about ten seconds of Syncing, time to kill the receiver midway
        job_id = create_job(server, source_id, "split", "--ReplicationParameters", json.dumps({"bandwidth_limit": 8}))
        server.call_json("StartReplicationJob", "--JobId", job_id)
        job = wait_status(server, job_id, "Running", "Syncing", timeout=30)
        ti = str(job["TransitionInstanceId"])
        wait_for(lambda: staging_bytes(server, ti) > 2 * MiB, timeout=30, what="data on the receiver")
        stop(receiver, sig_kill=True)
        time.sleep(2)  # the agent finds the receiver gone and keeps retrying its task
        receiver = start_receiver(data, rport)
        job = wait_status(server, job_id, "Finished", timeout=120)
        out = export(server, str(job["ImageId"]), 0, tmp_path / "out.img")
        assert sha256_file(out) == disk.sha256()
    finally:
        if agent:
            agent.stop()
        stop(receiver)
        stop(server.proc)
