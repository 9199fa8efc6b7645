"""A long OS adaptation holds its own job in Processing, not the orchestrator: other jobs go on meanwhile.

Processing runs on a worker thread per job (``leases.start_leased``). Here a
stand-in ``guestfish`` whose appliance "launches" until the test lets it fail
keeps job A's adaptation running for as long as the test wants; job B, of
another source, is started meanwhile and must go through Preparing, Syncing,
Processing and Cleaning to Finished while A is still Processing. A then
finishes with its unadapted image and the ``OsAdaptation.NotAdapted`` warning.
Without the worker threads B would wait in Preparing for A's whole adaptation.
No QEMU runs: the stand-in fails before any appliance would start.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess
from tests.e2e.disks import MiB, build_disk, require_tools, sha256_file
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

#: ``--listen`` reports a listener that is only a sleep; ``run`` waits for the flag file, then fails
STAND_IN = """#!/bin/sh
if [ "$1" = "--listen" ]; then
  sleep 900 </dev/null >/dev/null 2>&1 &
  echo "GUESTFISH_PID=$!; export GUESTFISH_PID"
  exit 0
fi
shift 2  # --remote=PID --
if [ "$1" = "run" ]; then
  i=0
  while [ ! -e "$OPENSMC_TEST_FLAG" ] && [ $i -lt 1500 ]; do sleep 0.2; i=$((i+1)); done
  echo "the stand-in appliance does not start" >&2
  exit 1
fi
exit 0
"""


def with_boot_code(path: Path) -> None:
    """Bytes in the MBR's boot code area (a GPT keeps the 0x55AA signature): adaptation is tried on it."""
    with path.open("r+b") as f:
        f.write(b"\xeb\x63\x90" + b"OPENSMC" * 40)


def register_another(server: ServerProcess, disks: list[Path], state: Path, known: set[str]) -> tuple[Agent, str]:
    token = server.call_json("CreateAccessToken", "--Name", f"e2e-{state.name}", "--Count", "2")
    agent = Agent(server, token, disks, state).start()

    def new_source() -> str | None:
        found = api(server, "DescribeSourceServers")["SourceServers"]["SourceServer"]
        fresh = [s for s in found if s["State"] == "Available" and s["SourceId"] not in known]
        return str(fresh[0]["SourceId"]) if fresh else None

    return agent, wait_for(new_source, 30, "the second source Available")


def test_a_long_adaptation_does_not_hold_other_jobs(tmp_path: Path) -> None:
    require_tools()
    for tool in ("qemu-img", "nbdkit"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "guestfish").write_text(STAND_IN)
    (bin_dir / "guestfish").chmod(0o755)
    flag = tmp_path / "let-it-fail"
    env = {
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "OPENSMC_TEST_FLAG": str(flag),
        "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg",  # no KVM probe: the stand-in's "run" is the only wait
    }
    disk_a = build_disk(tmp_path / "a.img", 32 * MiB, parts=1, seed=31, random_mib=4)
    with_boot_code(disk_a.path)
    disk_b = build_disk(tmp_path / "b.img", 32 * MiB, parts=1, seed=32, random_mib=4)
    server = start_migration_server(tmp_path, extra_env=env)
    agents: list[Agent] = []
    try:
        agent_a, source_a = register(server, [disk_a.path], tmp_path / "agent-a")
        agents.append(agent_a)
        agent_b, source_b = register_another(server, [disk_b.path], tmp_path / "agent-b", {source_a})
        agents.append(agent_b)

        job_a = create_job(server, source_a, "adapting")
        server.call_json("StartReplicationJob", "--JobId", job_a)
        wait_status(server, job_a, "Running", "Processing", timeout=90)

        # A's adaptation waits for the flag; B goes all the way meanwhile.
        job_b = create_job(server, source_b, "meanwhile", "--ReplicationParameters", '{"os_adaptation": false}')
        server.call_json("StartReplicationJob", "--JobId", job_b)
        done_b = wait_status(server, job_b, "Finished", timeout=120)
        a_now = describe(server, job_a)
        assert (a_now["Status"], a_now["BusinessStatus"]) == ("Running", "Processing"), a_now
        assert sha256_file(export(server, done_b["ImageId"], 0, tmp_path / "b.out")) == disk_b.sha256()

        flag.write_text("now\n")
        done_a = wait_status(server, job_a, "Finished", timeout=120)
        info = json.loads(done_a["StatusInfo"])
        assert info["error_code"] == "OsAdaptation.NotAdapted", info
        assert "the stand-in appliance does not start" in info["error_msg"], info
        assert sha256_file(export(server, done_a["ImageId"], 0, tmp_path / "a.out")) == disk_a.sha256()
    finally:
        for agent in agents:
            agent.stop()
        stop(server.proc)
