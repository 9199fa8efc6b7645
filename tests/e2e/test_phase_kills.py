"""kill -9 at every phase boundary of a run, then a restart: the job finishes, one image per run, nothing orphaned.

Each test starts the server with ``OPENSMC_CRASH_AT=<point>`` (``opensmc.faults``):
the process SIGKILLs itself the first time it reaches that point, exactly where a
crash is most likely to leave something half done. The server is then started
again on the same data dir and port, without the variable, and the agent (left
running) reconnects on its own. Every test then checks the same invariants:

- the job ends as it would have without the crash (Finished, or Waiting for an
  incremental job), without a second StartReplicationJob;
- each run that made an image made exactly one, no image row is left
  ``Creating``, and the store holds a snapshot for exactly the recorded images;
- the export is byte-identical to the source disk and ``check`` passes;
- nothing is orphaned: no pack without index, no pack holding only dead blobs
  (a second garbage collection finds nothing to do), no staging of a finished job.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from opensmc.chunkstore.staging import StagingIndex
from opensmc.faults import POINTS
from tests.e2e.conftest import ServerProcess
from tests.e2e.disks import Disk, MiB, build_disk, change_fraction, require_tools, sha256_file
from tests.e2e.flows import (
    Agent,
    create_job,
    db,
    export,
    images_of,
    make_due,
    register,
    runs,
    staging_dirs,
    start_migration_server,
    stop,
    store,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.e2e

#: process.adapting is reached only where OS adaptation runs: test_kill_during_os_adaptation
# build.*: file-level builds only, killed in tests/integration/test_file_level_receiver.py
RUN_ONCE_POINTS = [p for p in POINTS if not p.startswith(("gc.", "build.")) and p != "process.adapting"]
GC_POINTS = [p for p in POINTS if p.startswith("gc.")]


def crashed(server: ServerProcess) -> bool:
    return server.proc.poll() == -signal.SIGKILL


def restart(
    tmp_path: Path, server: ServerProcess, point: str, extra_env: dict[str, str] | None = None
) -> ServerProcess:
    wait_for(lambda: crashed(server) or None, timeout=90, what=f"the server to reach crash point {point}")
    port = int(server.endpoint.rsplit(":", 1)[1])
    return start_migration_server(tmp_path, port=port, extra_env=extra_env)


def check_invariants(server: ServerProcess, job_id: str, disk: Disk, tmp: Path, *, released: bool) -> None:
    image_rows = images_of(server, job_id)
    assert all(r["state"] == "Available" for r in image_rows), [dict(r) for r in image_rows]
    made = [r["image_id"] for r in runs(server, job_id) if r["image_id"]]
    assert len(made) == len(set(made)), made
    st = store(server)
    with db(server) as conn:
        recorded = {r["id"] for r in conn.execute("SELECT id FROM images")}
    assert set(st.list_images()) == recorded, (st.list_images(), recorded)
    latest = image_rows[-1]["id"]
    out = export(server, latest, 0, tmp / "exported.img")
    assert sha256_file(out) == disk.sha256()
    out.unlink()
    report = st.check()
    assert report.ok, report.errors
    ti = describe_ti(server, job_id)
    if released:
        assert staging_dirs(server, ti) == []
    # Nothing left for a collector: every pack without index and every dead blob is gone.
    again = st.gc(StagingIndex.read_disk(p) for p in staging_dirs(server, ti))
    assert not again.deferred and again.packs_deleted == again.packs_repacked == 0, again


def describe_ti(server: ServerProcess, job_id: str) -> str:
    with db(server) as conn:
        row = conn.execute("SELECT transition_instance_id FROM jobs WHERE id=?", (job_id,)).fetchone()
    return str(row["transition_instance_id"])


@pytest.mark.parametrize("point", RUN_ONCE_POINTS)
def test_kill_at_phase_boundary(tmp_path: Path, point: str) -> None:
    require_tools()
    disk = build_disk(tmp_path / "sys.img", 48 * MiB, parts=1, seed=21, random_mib=20)
    server = start_migration_server(tmp_path, extra_env={"OPENSMC_CRASH_AT": point})
    agent: Agent | None = None
    try:
        agent, source_id = register(server, [disk.path], tmp_path / "agent")
        job_id = create_job(server, source_id, "phase-kill")
        server.call_json("StartReplicationJob", "--JobId", job_id)
        server = restart(tmp_path, server, point)
        job = wait_status(server, job_id, "Finished", timeout=120)
        assert len(runs(server, job_id)) == 1, "the job finished without another StartReplicationJob"
        assert job["ImageId"]
        check_invariants(server, job_id, disk, tmp_path, released=True)
    finally:
        if agent:
            agent.stop()
        stop(server.proc)


@pytest.mark.parametrize("point", GC_POINTS)
def test_kill_during_garbage_collection(tmp_path: Path, point: str) -> None:
    require_tools()
    disk = build_disk(tmp_path / "sys.img", 48 * MiB, parts=1, seed=22, random_mib=32)
    server = start_migration_server(tmp_path, extra_env={"OPENSMC_CRASH_AT": point})
    agent: Agent | None = None
    try:
        agent, source_id = register(server, [disk.path], tmp_path / "agent")
        # Keep one image: the second run rotates the first away, and its blobs are collected.
        job_id = create_job(server, source_id, "gc-kill", "--RunOnce", "false", "--Frequency", "1",
                            "--MaxNumberOfImageToKeep", "1")  # fmt: skip
        server.call_json("StartReplicationJob", "--JobId", job_id)
        wait_status(server, job_id, "Waiting", timeout=90)
        change_fraction(disk, 0.5, seed=5)  # enough change that packs die or are worth repacking
        make_due(server, job_id)
        server = restart(tmp_path, server, point)
        wait_for(lambda: len(runs(server, job_id)) == 2 or None, 120, "run 2")
        wait_status(server, job_id, "Waiting", timeout=120)
        assert len(images_of(server, job_id)) == 1
        wait_for(lambda: not store(server).gc_wanted() or None, 30, "the interrupted gc to be finished")
        check_invariants(server, job_id, disk, tmp_path, released=False)
    finally:
        if agent:
            agent.stop()
        stop(server.proc)


def test_kill_during_os_adaptation(tmp_path: Path) -> None:
    """A kill while the system disk is adapted (its unadapted snapshot sealed, the guest being changed): the
    restarted server removes the half-made image and its temporary snapshot and makes the image again.

    The disk has bytes in its MBR's boot code area, so adaptation is tried. The restarted server has no
    libguestfs, so that attempt ends at once: an unadapted image (the source's bytes) with the warning.
    """
    require_tools()
    tools = {name: shutil.which(name) for name in ("qemu-img", "nbdkit")}
    if None in tools.values():
        pytest.skip("qemu-img and nbdkit are needed")
    disk = build_disk(tmp_path / "sys.img", 48 * MiB, parts=1, seed=23, random_mib=20)
    with disk.path.open("r+b") as f:
        f.write(b"\xeb\x63\x90" + b"OPENSMC" * 40)
    bin_dir = tmp_path / "bin"  # qemu-img and nbdkit, no guestfish
    bin_dir.mkdir()
    for name, path in tools.items():
        (bin_dir / name).symlink_to(str(path))
    server = start_migration_server(tmp_path, extra_env={"OPENSMC_CRASH_AT": "process.adapting"})
    agent: Agent | None = None
    try:
        agent, source_id = register(server, [disk.path], tmp_path / "agent")
        job_id = create_job(server, source_id, "adapt-kill")
        server.call_json("StartReplicationJob", "--JobId", job_id)
        server = restart(tmp_path, server, "process.adapting", extra_env={"PATH": str(bin_dir)})
        job = wait_status(server, job_id, "Finished", timeout=120)
        assert len(runs(server, job_id)) == 1, "the job finished without another StartReplicationJob"
        assert json.loads(job["StatusInfo"])["error_code"] == "OsAdaptation.NotAdapted", job
        check_invariants(server, job_id, disk, tmp_path, released=True)  # no .unadapted snapshot is left
        assert not list((server.data_dir / "tmp").glob(".adapt-*"))
    finally:
        if agent:
            agent.stop()
        stop(server.proc)
