"""Issue 9: partitions copied file by file (Block=false): a new, smaller filesystem with every entry kept.

A GPT system disk: a BIOS boot partition (GRUB's core image: copied block by
block), the root filesystem (copied file by file from its "mounted" tree onto
a smaller target) and a data partition (block by block, moved back by the
shrink). The exported image is checked: the partition table rewritten with
the same label id, partition UUIDs, types and names; the boot code and the
block partitions byte-identical; the new filesystem passes ``e2fsck -fn``,
keeps the source's UUID and label, and holds the source tree minus the
excludes, entry by entry, metadata included. Then the tree changes (added,
modified, deleted, renamed, re-owned) and an incremental run reflects it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess, free_port, stop
from tests.e2e.disks import require_tools
from tests.e2e.flows import (
    agent_stats,
    create_job,
    export,
    make_due,
    register,
    runs,
    start_migration_server,
    wait_for,
    wait_status,
)
from tests.e2e.trees import compare, excluded, image_entries, make_root_tree, source_entries

MiB = 1024 * 1024
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="file-level copies keep owners and devices: needs root")


def _sfdisk_json(path: Path) -> dict:
    out = subprocess.run(["sfdisk", "-J", str(path)], capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out)["partitiontable"])


def _uuid_label(fs: Path) -> tuple[str, str]:
    out = subprocess.run(["dumpe2fs", "-h", str(fs)], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return fields["Filesystem UUID"].strip(), fields["Filesystem volume name"].strip()


def _build_source(tmp: Path) -> tuple[Path, Path]:
    """(disk image, the root partition's tree)."""
    require_tools()
    tree = tmp / "root-tree"
    make_root_tree(tree)
    disk = tmp / "sys.img"
    with disk.open("wb") as f:
        f.truncate(192 * MiB)
    script = (
        "label: gpt\n"
        f"start=2048, size=2048, type={BIOS_BOOT}, name=bios\n"
        "start=4096, size=196608, type=linux, name=root\n"
        "start=200704, size=98304, type=linux, name=data\n"
    )
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk)], input=script, text=True, check=True)
    rng = random.Random(5)
    root_fs, data_fs = tmp / "root.fs", tmp / "data.fs"
    for fs, size in ((root_fs, 96 * MiB), (data_fs, 48 * MiB)):
        with fs.open("wb") as f:
            f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", str(tree), str(root_fs)], check=True)
    data_tree = tmp / "data-tree"
    data_tree.mkdir()
    (data_tree / "payload").write_bytes(rng.randbytes(3 * MiB))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "data", "-d", str(data_tree), str(data_fs)], check=True)
    with disk.open("r+b") as f:
        f.write(rng.randbytes(440))  # boot code (GRUB's boot.img would be here)
        f.seek(1 * MiB)
        f.write(rng.randbytes(1 * MiB))  # the BIOS boot partition: GRUB's core.img
        f.seek(2 * MiB)
        f.write(root_fs.read_bytes())
        f.seek(98 * MiB)
        f.write(data_fs.read_bytes())
    return disk, tree


def _check_image(tmp: Path, server: ServerProcess, image_id: str, disk: Path, tree: Path, name: str) -> None:
    out = export(server, image_id, 0, tmp / f"{name}.img")
    src, got = disk.read_bytes(), out.read_bytes()
    assert len(got) == len(src)
    assert got[:440] == src[:440], "the boot code changed"
    assert got[1 * MiB : 2 * MiB] == src[1 * MiB : 2 * MiB], "the BIOS boot partition changed"
    t_src, t_got = _sfdisk_json(disk), _sfdisk_json(out)
    assert t_got["id"] == t_src["id"]
    a, b = t_src["partitions"], t_got["partitions"]
    assert [p["start"] for p in b] == [2048, 4096, 4096 + 131072]
    assert [p["size"] for p in b] == [2048, 131072, 98304]
    for key in ("type", "uuid", "name"):
        assert [p.get(key) for p in b] == [p.get(key) for p in a], key
    moved = (4096 + 131072) * 512
    assert got[moved : moved + 48 * MiB] == src[98 * MiB : 146 * MiB], "the data partition did not move intact"
    fs = tmp / f"{name}-root.fs"
    fs.write_bytes(got[2 * MiB : 66 * MiB])
    fsck = subprocess.run(["e2fsck", "-fn", str(fs)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    src_fs = tmp / "src-root.fs"
    src_fs.write_bytes(src[2 * MiB : 98 * MiB])
    assert _uuid_label(fs) == _uuid_label(src_fs)
    img = image_entries(fs)
    problems = compare(source_entries(tree), img)
    assert not problems, "\n".join(problems)
    assert img["/var/lib/app/sparse.db"]["blocks"] < 64, "the sparse file was filled in"
    assert img["/proc"]["kind"] == "dir" and img["/tmp"]["kind"] == "dir", "excluded contents, kept directories"


def test_block_false_partition_copied_file_by_file_onto_a_smaller_target(tmp_path: Path) -> None:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    disk, tree = _build_source(tmp_path)
    excludes = tmp_path / "excludes.txt"
    excludes.write_text("# SMC's format: one rsync pattern per line\n/var/cache/*\n")
    server = start_migration_server(tmp_path)
    agent = None
    try:
        agent, source_id = register(
            server, [disk], tmp_path / "agent", ["--mount", f"0_1={tree}", "--exclude-file", str(excludes)]
        )
        job_id = create_job(
            server,
            source_id,
            "file-level",
            "--RunOnce",
            "false",
            "--Frequency",
            "1",
            "--MaxNumberOfImageToKeep",
            "2",
            "--SystemDiskPart.1.Device",
            "0_1",
            "--SystemDiskPart.1.SizeBytes",
            str(64 * MiB),
            "--SystemDiskPart.1.Block",
            "false",
        )
        server.call_json("StartReplicationJob", "--JobId", job_id)
        job = wait_status(server, job_id, "Waiting", timeout=120)
        _check_image(tmp_path, server, job["ImageId"], disk, tree, "run1")
        first = agent_stats(runs(server, job_id)[0])
        assert first["files_bytes"] > 0
        (shown,) = job["ReplicationJobRuns"]["ReplicationJobRun"]  # rsync's count of the tree (excludes out)
        assert shown["FilesDone"] == shown["FilesTotal"] == first["files"] > 20

        # Changes of every kind; then an incremental run, which patches the last image (the server log says).
        _change_every_kind(tree)
        make_due(server, job_id)
        wait_for(lambda: len(runs(server, job_id)) > 1, 30, "the next run to start")
        job = wait_status(server, job_id, "Waiting", timeout=120)
        assert len(job["ReplicationJobRuns"]["ReplicationJobRun"]) == 2
        _check_image(tmp_path, server, job["ImageId"], disk, tree, "run2")
    finally:
        if agent:
            agent.stop()
        stop(server.proc)
    log = (tmp_path / "agent.log").read_text()
    assert "copying the files of" in log, log[-3000:]
    receiver_log = "".join(p.read_text() for p in tmp_path.glob("server*.log"))
    assert "filesystem of 67108864 bytes patched" in receiver_log, receiver_log[-3000:]
    assert "built again" not in receiver_log, receiver_log[-3000:]


def _change_every_kind(tree: Path) -> None:
    """Added, modified (content and mtime), deleted, renamed, re-owned, re-moded, hard-linked, xattrs and
    ACLs added and removed, a new sparse file, device node, FIFO, symlink and directory, a directory removed."""
    (tree / "etc/new.conf").write_text("added\n")
    (tree / "etc/hostname").write_text("changed\n")
    os.unlink(tree / "var/lib/app/f00")
    os.rename(tree / "var/lib/app/f01", tree / "var/lib/app/f01.renamed")
    os.chown(tree / "var/lib/app/f02", 42, 42)
    os.chmod(tree / "var/lib/app/f03", 0o640)
    os.utime(tree / "var/lib/app/f04", (1_400_000_000, 1_400_000_000))
    os.link(tree / "var/lib/app/f05", tree / "var/lib/app/f05.link")  # a new hard link to an old file
    (tree / "srv/new").mkdir(parents=True)
    (tree / "srv/new/leader").write_bytes(b"linked\n" * 300)
    os.link(tree / "srv/new/leader", tree / "srv/new/follower")  # a new hard-link group
    os.setxattr(tree / "var/lib/app/f06", "user.added", b"new attr")
    os.removexattr(tree / "home/user/secret", "user.comment")
    subprocess.run(["setfacl", "-m", "u:4321:rw", str(tree / "var/lib/app/f07")], check=True)
    subprocess.run(["setfacl", "-b", str(tree / "home/user/secret")], check=True)
    with (tree / "srv/new/sparse").open("wb") as f:
        f.truncate(6 * MiB)
        f.seek(5 * MiB)
        f.write(b"tail")
    os.mknod(tree / "srv/new/tty", 0o620 | stat.S_IFCHR, os.makedev(4, 1))
    os.mkfifo(tree / "srv/new/pipe", 0o600)
    os.symlink("../../etc/new.conf", tree / "srv/new/conf-link")
    os.unlink(tree / "usr/bin/tool-link")
    os.symlink("tool-hardlink", tree / "usr/bin/tool-link")  # a symlink pointing elsewhere
    shutil.rmtree(tree / "empty")
    (tree / "var/lib/app/fifo").unlink()
    (tree / "var/lib/app/fifo").write_text("a file where a FIFO was\n")


def test_block_false_partition_not_mounted_is_refused_before_data_moves(tmp_path: Path) -> None:
    disk, _tree = _build_source(tmp_path)
    server = start_migration_server(tmp_path)
    agent = None
    try:
        agent, source_id = register(server, [disk], tmp_path / "agent")
        job_id = create_job(
            server, source_id, "unmounted", "--SystemDiskPart.1.Device", "0_1", "--SystemDiskPart.1.SizeBytes",
            str(64 * MiB), "--SystemDiskPart.1.Block", "false",
        )  # fmt: skip
        server.call_json("StartReplicationJob", "--JobId", job_id)
        job = wait_status(server, job_id, "InError", timeout=60)
        assert "not mounted" in job["StatusInfo"] and "--mount 0_1=DIR" in job["StatusInfo"], job
        assert agent_stats(runs(server, job_id)[0]).get("bytes_plain", 0) == 0
    finally:
        if agent:
            agent.stop()
        stop(server.proc)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rsync_servers_into(staging: Path) -> list[int]:
    """Processes running ``rsync --server`` into a tree under ``staging``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--server" in args and any(a.startswith(str(staging).encode()) for a in args):
            found.append(int(proc.name))
    return found


def test_killed_agent_and_server_mid_file_copy_resume_without_resending(tmp_path: Path) -> None:
    """kill -9 of the agent, then of the server, while files move: the run goes on from what the tree holds."""
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    disk, tree = _build_source(tmp_path)
    bulk = tree / "srv" / "bulk"
    bulk.mkdir(parents=True)
    rng = random.Random(9)
    for i in range(30):
        (bulk / f"part{i:02d}").write_bytes(rng.randbytes(MiB))
    port, rport = free_port(), free_port()
    listen = ("--receiver-listen", f"127.0.0.1:{rport}")
    server = start_migration_server(tmp_path, *listen, port=port)
    agent = None
    try:
        agent, source_id = register(server, [disk], tmp_path / "agent", ["--mount", f"0_1={tree}"])
        job_id = create_job(
            server, source_id, "resume", "--ReplicationParameters", json.dumps({"bandwidth_limit": 40}),
            "--SystemDiskPart.1.Device", "0_1", "--SystemDiskPart.1.SizeBytes", str(72 * MiB),
            "--SystemDiskPart.1.Block", "false",
        )  # fmt: skip
        server.call_json("StartReplicationJob", "--JobId", job_id)
        received = server.data_dir / "staging"

        def files_in_tree() -> int:
            return sum(1 for p in received.glob("*.tree/srv/bulk/part*") if p.stat().st_size == MiB)

        wait_for(lambda: files_in_tree() >= 5, 60, "some files to arrive")
        agent.stop(sig_kill=True)
        held = files_in_tree()
        assert held < 30, "the copy finished before the agent was killed"
        agent.start()
        wait_for(lambda: files_in_tree() >= held + 5, 60, "more files to arrive")
        # The receiver's rsync holds the connection's socket itself: it must end with the server.
        # The agent is held still meanwhile, so that an rsync left running would wait on the
        # socket forever rather than finish the copy on its own.
        assert agent.proc is not None
        frozen = [agent.proc.pid, *_descendants(agent.proc.pid)]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            stop(server.proc, sig_kill=True)
            wait_for(lambda: not _rsync_servers_into(received), 30, "the receiver's rsync to end with its server")
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        held = files_in_tree()
        server = start_migration_server(tmp_path, *listen, port=port)
        job = wait_status(server, job_id, "Finished", timeout=180)
        [run] = runs(server, job_id)  # one run: the restarted agent and server continued it
        stats = agent_stats(run)
        regular = sum(1 for p, e in source_entries(tree).items() if e["kind"] == "file" and not excluded(p, ()))
        # the last attempt sent only what the tree lacked: not the files it held when the server died
        assert 0 < stats["files_sent"] <= regular - held, (stats, regular, held)
        out = export(server, job["ImageId"], 0, tmp_path / "resumed.img")
        fs = tmp_path / "resumed-root.fs"
        with out.open("rb") as f:
            f.seek(2 * MiB)
            fs.write_bytes(f.read(72 * MiB))
        assert subprocess.run(["e2fsck", "-fn", str(fs)], capture_output=True).returncode == 0
        problems = compare(source_entries(tree), image_entries(fs), extra=())
        assert not problems, "\n".join(problems)
    finally:
        if agent:
            agent.stop()
        stop(server.proc)
