"""Crash/resume at random moments: ``kill -9`` of the agent, the server or the receiver mid-migration.

One migration of a 96 MiB GPT/ext4 disk is held to ~3 MB/s (``bandwidth_limit``
24 Mbit/s, so Syncing lasts about 15-20 s) and, during it, a seeded
``random.Random`` picks three moments and a victim for each: the agent, the
whole ``opensmc server`` (default roles) or, in the split layout
(``--roles api,orchestrator`` + a ``--roles receiver`` process, as in
test_roles.py), the API/orchestrator process or the receiver alone. The victim
is restarted with the same data dir / state dir after a random outage, and the
job must end Finished with an image byte-identical to the source and clean
file systems.

The seed is printed and named in every failure message; ``OPENSMC_KILL_SEED=<n>``
replays a run.

Re-sending is bounded honestly: an attempt that is killed records nothing (the
agent's per-attempt counters die with it, and the ``LostContact.sent`` figure is
only used for the retry counter, never reported), so the test asserts on the
attempt that finished (``job_runs.detail`` agent ``bytes_plain``): it sent at
most what the receiver did not hold before the last kill preceding its start
(attempts are counted in the agent's log: one may ride out a kill), plus a
margin; and less than a full send when that kill came after 30% had landed.

Two more tests kill the server while the job is Processing (the image being made
under the job's lease, ``service/leases.py``). The lease owner is
``<machine>:<pid>`` and ``LEASE`` is 15 seconds (renewed while held); a restarted
server is a new owner, and it takes over at once because a lease whose owner is a
dead process of the same machine counts as free (``dead_local_owner``). A lease of
another machine is waited out, for at most ``LEASE``.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from opensmc.service import leases
from tests.e2e.conftest import ServerProcess, free_port, start_server, stop
from tests.e2e.disks import Disk, MiB, build_disk, fsck_partitions, nonzero_bytes, require_tools, sha256_file
from tests.e2e.flows import (
    Agent,
    agent_stats,
    create_job,
    db,
    describe,
    export,
    images_of,
    register,
    runs,
    staging_bytes,
    store,
    wait_for,
    wait_status,
)
from tests.e2e.test_roles import start_receiver

pytestmark = pytest.mark.e2e

SEED_ENV = "OPENSMC_KILL_SEED"
LIMIT_MBIT = 24  # 3 MB/s: the ~50 MB that a full send moves take ~17 s
KILLS = 3
#: what a resumed attempt may send beyond the chunks the receiver lacked: torn chunks of the
#: batch in flight at a kill (dropped when the receiver rebuilds its map) and blocks that the
#: staging byte count includes but no chunk holds (the map file, file system preallocation)
SLACK = 16 * MiB
#: ErrorCodes that say "the migration was interrupted" (agent lost, receiver unreachable)
INTERRUPTION_CODES = {"SourceServer.Offline", "Agent.ReceiverUnreachable"}


def kill_seed() -> int:
    raw = os.environ.get(SEED_ENV)
    return int(raw) if raw else random.SystemRandom().randrange(1 << 32)


@contextmanager
def replayable(seed: int, events: list[str]) -> Iterator[None]:
    """Name the seed (and what was killed when) in any failure, so it can be replayed."""
    print(f"random kills: seed {seed} (replay with {SEED_ENV}={seed})")
    try:
        yield
        print("events:\n  " + "\n  ".join(events))
    except Exception as exc:
        note = f"--- random kills: seed {seed}, replay with {SEED_ENV}={seed}; events:\n  " + "\n  ".join(events)
        if isinstance(exc, AssertionError):  # keep the type (an xfail names its exception)
            exc.args = (f"{exc}\n{note}",)
            raise
        raise AssertionError(f"{exc!r}\n{note}") from exc


@dataclass
class Rig:
    tmp: Path
    disk: Disk
    sha: str
    nonzero: int
    split: bool
    port: int
    rport: int
    server: ServerProcess
    receiver: subprocess.Popen[str] | None
    agent: Agent | None = None
    source_id: str = ""

    @property
    def data(self) -> Path:
        return self.tmp / "data"

    def start_api(self) -> ServerProcess:
        return start_api(self.tmp / "data", self.split, self.port, self.rport)

    def job_row(self, job_id: str) -> sqlite3.Row:
        with db(self.server) as conn:
            row: sqlite3.Row | None = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        assert row is not None, job_id
        return row

    def held(self, ti: str) -> int:
        return staging_bytes(self.server, ti)


def start_api(data: Path, split: bool, port: int, rport: int) -> ServerProcess:
    """The server (all roles), or in the split layout the api,orchestrator process; same ports each time."""
    common = ("--heartbeat-rate", "1", "--heartbeat-grace", "30")
    if split:
        return start_server(
            data, "--roles", "api,orchestrator", "--receiver-endpoint", f"http://127.0.0.1:{rport}", *common, port=port
        )
    return start_server(data, "--receiver-listen", f"127.0.0.1:{rport}", *common, port=port)


def make_rig(tmp: Path, split: bool) -> Rig:
    require_tools()
    disk = build_disk(tmp / "sys.img", 96 * MiB, label="gpt", parts=2, seed=7, files=10, random_mib=40)
    port, rport = free_port(), free_port()
    server = start_api(tmp / "data", split, port, rport)
    receiver = start_receiver(tmp / "data", rport) if split else None
    rig = Rig(tmp, disk, disk.sha256(), nonzero_bytes(disk.path), split, port, rport, server, receiver)
    try:
        rig.agent, rig.source_id = register(rig.server, [disk.path], tmp / "agent")
    except BaseException:
        teardown(rig)
        raise
    return rig


def teardown(rig: Rig) -> None:
    if rig.agent is not None:
        rig.agent.stop()
    if rig.receiver is not None:
        stop(rig.receiver)
    stop(rig.server.proc)


def attempts_started(rig: Rig) -> int:
    """Send attempts the agent has started so far (its log, appended across restarts)."""
    assert rig.agent is not None
    return rig.agent.log_text().count(": sending ")


def kill_and_restart(rig: Rig, victim: str, outage: float, ti: str) -> int:
    """``kill -9`` the victim, leave it down for ``outage`` s, restart it; staging bytes held meanwhile."""
    assert rig.agent is not None
    if victim == "agent":
        rig.agent.stop(sig_kill=True)
    elif victim == "server":
        stop(rig.server.proc, sig_kill=True)
    else:
        assert rig.receiver is not None
        stop(rig.receiver, sig_kill=True)
    time.sleep(outage)
    held = rig.held(ti)
    if victim == "agent":
        rig.agent.start()  # same state dir: the same source, the same task
    elif victim == "server":
        rig.server = rig.start_api()
        rig.agent.server = rig.server
    else:
        rig.receiver = start_receiver(rig.data, rig.rport)
    return held


def wait_end(rig: Rig, job_id: str, timeout: float) -> dict[str, Any]:
    """The job once it is Finished or InError."""

    def ended() -> dict[str, Any] | None:
        job = describe(rig.server, job_id)
        return job if job["Status"] in ("Finished", "InError") else None

    return wait_for(
        ended,
        timeout,
        f"{job_id} Finished or InError",
        every=0.5,
    )


def check_image(rig: Rig, job: dict[str, Any]) -> None:
    assert job["Progress"] == 100, job
    out = export(rig.server, str(job["ImageId"]), 0, rig.tmp / "exported.img")
    assert sha256_file(out) == rig.sha, "the exported system disk differs from the source"
    assert fsck_partitions(out, rig.disk) == []


@pytest.mark.parametrize("layout", ["combined", "split"])
def test_random_kills_during_sync(tmp_path: Path, layout: str) -> None:
    seed = kill_seed()
    rng = random.Random(seed)
    split = layout == "split"
    victims = ["agent", "server", "receiver"] if split else ["agent", "server"]
    events: list[str] = [f"layout {layout}"]
    rig: Rig | None = None
    with replayable(seed, events):
        try:
            rig = make_rig(tmp_path, split)
            params = json.dumps({"bandwidth_limit": LIMIT_MBIT})
            job_id = create_job(rig.server, rig.source_id, "random-kills", "--ReplicationParameters", params)
            rig.server.call_json("StartReplicationJob", "--JobId", job_id)
            ti = str(wait_status(rig.server, job_id, "Running", "Syncing", timeout=30)["TransitionInstanceId"])
            started = time.monotonic()

            # (attempts the agent had started, staging bytes held) just before each kill
            marks: list[tuple[int, int]] = []
            for n in range(KILLS):
                delay = rng.uniform(0.5, 3.5)
                victim = rng.choice(victims)
                outage = rng.uniform(0.1, 2.0)
                time.sleep(delay)
                row = rig.job_row(job_id)
                held = rig.held(ti)
                if (row["status"], row["business_status"]) != ("Running", "Syncing") or held >= 0.95 * rig.nonzero:
                    events.append(f"kill {n + 1}: skipped, job {row['status']}/{row['business_status']}, {held} held")
                    break
                marks.append((attempts_started(rig), held))
                at = time.monotonic() - started
                events.append(
                    f"kill {n + 1}: {victim} at +{at:.1f}s (delay {delay:.2f}s), {held / rig.nonzero:.0%} held, "
                    f"down {outage:.2f}s"
                )
                settled = kill_and_restart(rig, victim, outage, ti)
                events[-1] += f", {settled / rig.nonzero:.0%} held on restart"
            assert marks, "no kill happened while the job was Syncing"

            job = wait_end(rig, job_id, 90)
            restarts = 0
            while job["Status"] == "InError" and restarts < 2:
                events.append(f"InError {job['ErrorCode']}: {job['StatusInfo']}")
                assert job["ErrorCode"] in INTERRUPTION_CODES, (
                    f"the job failed with {job['ErrorCode']!r}, which does not name the interruption"
                )
                rig.server.call_json("StartReplicationJob", "--JobId", job_id)
                restarts += 1
                job = wait_end(rig, job_id, 90)
            assert job["Status"] == "Finished", job
            events.append(f"Finished after {restarts} StartReplicationJob(s)")
            check_image(rig, job)

            all_runs = runs(rig.server, job_id)
            assert len(all_runs) == 1 + restarts, [dict(r) for r in all_runs]
            sent = int(agent_stats(all_runs[-1])["bytes_plain"])
            # The attempt that finished started from the receiver's map, which held at least
            # what had landed before the last kill that came before that attempt began (an
            # attempt may also ride out a kill: the agent was between batches). It sends the
            # rest, plus a margin for torn chunks of the batch in flight.
            final = attempts_started(rig)
            base = max((held for before, held in marks if before < final), default=0)
            events.append(f"the finishing attempt (#{final}) sent {sent} of {rig.nonzero}; {base} held before it began")
            assert sent <= rig.nonzero - base + SLACK, (sent, rig.nonzero, base)
            if base >= 0.3 * rig.nonzero:
                assert sent < rig.nonzero, "the finishing attempt re-sent the whole disk"
        finally:
            if rig is not None:
                teardown(rig)


def test_server_killed_while_processing(tmp_path: Path) -> None:
    seed = kill_seed()
    rng = random.Random(seed)
    events: list[str] = []
    rig: Rig | None = None
    with replayable(seed, events):
        try:
            rig = make_rig(tmp_path, split=False)
            # checksum: the image is also verified, which makes Processing (~0.4 s here) easier to hit
            params = json.dumps({"checksum": True})
            for attempt in range(3):
                job_id = create_job(
                    rig.server, rig.source_id, f"kill-processing-{attempt}", "--ReplicationParameters", params
                )
                rig.server.call_json("StartReplicationJob", "--JobId", job_id)
                pause = rng.uniform(0.0, 0.15) / 2**attempt

                def processing(job_id: str = job_id) -> sqlite3.Row | None:
                    row = rig.job_row(job_id)
                    return row if row["business_status"] == "Processing" and row["lease_owner"] else None

                wait_for(processing, 60, "the job Processing under a lease", every=0.005)
                time.sleep(pause)
                dead_pid = rig.server.proc.pid
                stop(rig.server.proc, sig_kill=True)
                row = rig.job_row(job_id)
                events.append(
                    f"server pid {dead_pid} killed {pause * 1000:.0f} ms into Processing: job "
                    f"{row['status']}/{row['business_status']}, lease {row['lease_owner']} until {row['lease_until']}"
                )
                if row["status"] == "Running" and row["business_status"] == "Processing":
                    break
                # The image was made before the kill landed (the job is in Cleaning, which holds no
                # lease, or past it): try again, sooner, with a new job.
                rig.server = rig.start_api()
            else:
                pytest.skip(f"every kill landed after the image was made; seed {seed}")
            assert row["lease_owner"] == f"{leases.MACHINE}:{dead_pid}", row["lease_owner"]

            rig.server = rig.start_api()
            events.append(f"restarted as pid {rig.server.proc.pid}")
            # The lease (LEASE, 15 s) names a process that is gone: the restarted server
            # takes the job over at once instead of waiting it out.
            job = wait_end(rig, job_id, 30)
            if job["Status"] == "InError":
                assert job["ErrorCode"] in INTERRUPTION_CODES, job
                rig.server.call_json("StartReplicationJob", "--JobId", job_id)
                job = wait_end(rig, job_id, 60)
            assert job["Status"] == "Finished", job
            check_image(rig, job)
            named = {str(r["id"]) for r in images_of(rig.server, job_id)}
            assert named == {job["ImageId"]}, named
            # Not asserted (it depends on where the kill landed): a kill after the image's
            # manifest was written but before its row was (e.g. during the checksum
            # verification) leaves a manifest that no row names, and its chunks stay live.
            with db(rig.server) as conn:
                rows = {str(r[0]) for r in conn.execute("SELECT id FROM images")}
            orphans = sorted(set(store(rig.server).list_images()) - rows)
            events.append(f"image manifests no row names: {orphans or 'none'}")
        finally:
            if rig is not None:
                teardown(rig)


class OrphanImage(AssertionError):
    """An image manifest in the image store that no ``images`` row names."""


def test_server_killed_after_image_written_leaves_no_orphan(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, split=False)
    try:
        job_id = create_job(
            rig.server, rig.source_id, "kill-after-manifest", "--ReplicationParameters", json.dumps({"checksum": True})
        )
        rig.server.call_json("StartReplicationJob", "--JobId", job_id)
        snapshots = rig.data / "store" / "snapshots"
        wait_for(lambda: list(snapshots.glob("m-*")), 60, "the image's snapshot", every=0.002)
        stop(rig.server.proc, sig_kill=True)  # during the checksum verification, before the row
        if rig.job_row(job_id)["status"] != "Running":
            pytest.skip("the image row was written before the kill landed")
        rig.server = rig.start_api()
        job = wait_end(rig, job_id, 30)
        assert job["Status"] == "Finished", job
        check_image(rig, job)
        with db(rig.server) as conn:
            rows = {str(r[0]) for r in conn.execute("SELECT id FROM images")}
        orphans = sorted(set(store(rig.server).list_images()) - rows)
        if orphans:
            raise OrphanImage(f"image manifests without a row after the restart: {orphans} (rows {sorted(rows)})")
    finally:
        teardown(rig)
