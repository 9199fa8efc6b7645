"""Receivers on several hosts: runs placed by room, a receiver killed mid-run hands its run over.

The hosts are network namespaces on a bridge (``tests/netns.py``): the API and
orchestrator on one, a receiver on each of two more, the agents (two sources)
on a fourth. PostgreSQL is the root namespace's, reached through a forwarder
on the bridge. The data directory (staging indexes, master key, image store)
is one directory that every host sees, as a shared filesystem would be.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from opensmc.store.db import normalize_url
from tests import netns
from tests.conftest import PG_URL, _pg_available
from tests.e2e.conftest import stop
from tests.e2e.flows import api, create_job, export, staging_bytes, wait_for, wait_status
from tests.e2e.multihost import Installation

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

MiB = 1 << 20


@pytest.fixture
def install(tmp_path: Path) -> Iterator[Installation]:
    if not _pg_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
    why = netns.probe()
    if why:
        pytest.skip(f"no network namespaces for the hosts: {why}")
    admin = create_engine(normalize_url(PG_URL), isolation_level="AUTOCOMMIT")
    name = f"opensmc_hosts_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    pg_url = make_url(normalize_url(PG_URL)).set(database=name).render_as_string(hide_password=False)
    pg = make_url(pg_url)
    inst: Installation | None = None
    try:
        with netns.hosts(["api", "recv1", "recv2", "sources"]) as hosts:
            inst = Installation(hosts, tmp_path / "shared", pg_url, hosts.forward(pg.port or 5432, pg.host or ""))
            inst.data.mkdir()
            try:
                yield inst
            finally:
                inst.stop_all()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def disk_with_data(path: Path, size: int, data: int, seed: int) -> Path:
    import random

    rnd = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(4 * MiB)
        f.write(rnd.randbytes(data))
    return path


def test_a_killed_receiver_hands_its_run_over_to_another_host(install: Installation, tmp_path: Path) -> None:
    server = install.server("api", "api,orchestrator", "--heartbeat-rate", "1", "--heartbeat-grace", "120")
    recv = {h: install.server(h, "receiver") for h in ("recv1", "recv2")}
    engine = create_engine(normalize_url(install.pg_url))
    try:
        with engine.connect() as conn:
            registered = {r[0] for r in conn.execute(text("SELECT endpoint FROM receivers"))}
        assert registered == {install.receiver_url("recv1"), install.receiver_url("recv2")}

        # Two sources on one host, ~12 MiB of data each at 8 Mbit/s: ~12 s of Syncing each.
        disks = [disk_with_data(tmp_path / f"d{i}.img", 40 * MiB, 12 * MiB, seed=70 + i) for i in range(2)]
        token = server.call_json("CreateAccessToken", "--Name", "hosts", "--Count", "5")
        agents = [install.agent("sources", server, token, d, tmp_path / f"agent{i}") for i, d in enumerate(disks)]

        def sources() -> list[str] | None:
            found = api(server, "DescribeSourceServers")["SourceServers"]["SourceServer"]
            ok = sorted(str(s["SourceId"]) for s in found if s["State"] == "Available")
            return ok if len(ok) == 2 else None

        source_ids = wait_for(sources, 60, "two sources Available")
        by_source = {}
        for i, sid in enumerate(source_ids):
            job_id = create_job(
                server, sid, f"hosts-{i}", "--ReplicationParameters", json.dumps({"bandwidth_limit": 8})
            )
            by_source[sid] = job_id
            server.call_json("StartReplicationJob", "--JobId", job_id)
            wait_status(server, job_id, "Running", "Syncing", timeout=60)
        job_ids = list(by_source.values())

        def placement() -> dict[str, str]:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT id, receiver FROM jobs WHERE id = ANY(:ids)"), {"ids": job_ids})
                return {r.id: r.receiver for r in rows}

        placed = placement()
        # The rule: the second run goes where the first did not (both had room, the first had one run).
        assert set(placed.values()) == {install.receiver_url("recv1"), install.receiver_url("recv2")}, placed
        victim_job = job_ids[0]
        victim_host = next(h for h in recv if install.receiver_url(h) == placed[victim_job])
        other_host = next(h for h in recv if h != victim_host)
        ti = str(
            api(server, "DescribeReplicationJobs", JobId__1=victim_job)["ReplicationJobs"]["ReplicationJob"][0][
                "TransitionInstanceId"
            ]
        )
        wait_for(lambda: staging_bytes(server, ti) > 2 * MiB, timeout=60, what="data stored by the first receiver")
        held_before_kill = staging_bytes(server, ti)
        stop(recv[victim_host].proc, sig_kill=True)

        finished = {j: wait_status(server, j, "Finished", timeout=180) for j in job_ids}
        assert placement()[victim_job] == install.receiver_url(other_host)
        assert (
            f"job {victim_job}: receiver {placed[victim_job]} is silent; its run goes on at" in server.log.read_text()
        )
        # Which agent (and disk) became which source is not known here: the images, together, are the disks.
        images = {
            hashlib.sha256(export(server, str(job["ImageId"]), 0, tmp_path / f"{j}.out").read_bytes()).hexdigest()
            for j, job in finished.items()
        }
        assert images == {hashlib.sha256(d.read_bytes()).hexdigest() for d in disks}
        # The run resumed on the second host from what the first stored: the attempt that
        # finished sent less than the whole disk's data.
        with engine.connect() as conn:
            detail = conn.execute(
                text("SELECT detail FROM job_runs WHERE job_id = :j ORDER BY id DESC LIMIT 1"), {"j": victim_job}
            ).scalar_one()
        sent = int(json.loads(detail)["agent"]["bytes_plain"])
        assert sent <= 12 * MiB - held_before_kill + 2 * MiB, (sent, held_before_kill)
        assert any(f"task {victim_job}:" in a.log_text() and "lost contact" in a.log_text() for a in agents)
    finally:
        engine.dispose()
