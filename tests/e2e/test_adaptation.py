"""OS adaptation for KVM, end to end: a guest as a SATA machine leaves it boots on virtio only once adapted.

The legacy guest (tests/guest.py ``legacy_guest``) has a host-only initramfs
(SATA/IDE drivers, no virtio), ``/dev/sda1`` in fstab and on the kernel
command line, a persistent-net rule, and its NIC ``eth0`` with a static
address in ``/etc/network/interfaces`` and a MAC-bound netplan file. A real server and agent migrate it
twice: with ``os_adaptation: false`` the image boots from a SATA disk and
fails on virtio, in the initramfs; with adaptation on (the default) and a
20 GiB system disk, Processing adapts it with libguestfs and the image boots
on virtio, its last partition and ext4 grown to the disk. Marked ``boot``
(``-m "not boot"`` skips it); it needs QEMU, nbdkit and libguestfs-tools.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import OPENSMC, clean_env, stop
from tests.e2e.flows import create_job, register, runs, start_migration_server, store, wait_status
from tests.guest import LEGACY_INTERFACES, MiB, legacy_guest

pytestmark = [pytest.mark.e2e, pytest.mark.boot]

GiB = 1024 * MiB


def _image(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OPENSMC, "image", *args], capture_output=True, text=True, timeout=timeout, env=clean_env())


def _image_started(*args: str) -> subprocess.Popen[str]:
    """``opensmc image …`` in the background, in a process group of its own (:func:`_kill` ends its QEMU too)."""
    return subprocess.Popen(
        [*OPENSMC, "image", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        start_new_session=True,
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _finished(proc: subprocess.Popen[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _debugfs_cat(fs: str, path: str) -> str:
    """A file of an ext4 file system (``image?offset=N``), read without mounting it."""
    done = subprocess.run(["debugfs", "-R", f"cat {path}", fs], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _migrate(server: object, source_id: str, name: str, *params: str) -> tuple[str, dict[str, object]]:
    job_id = create_job(server, source_id, name, *params)  # type: ignore[arg-type]
    server.call("StartReplicationJob", "--JobId", job_id)  # type: ignore[attr-defined]
    job = wait_status(server, job_id, "Finished", timeout=900)  # type: ignore[arg-type]
    (run,) = runs(server, job_id)  # type: ignore[arg-type]
    return str(job["ImageId"]), {**json.loads(run["detail"] or "{}"), "StatusInfo": job.get("StatusInfo")}


@pytest.mark.timeout(1800)  # four TCG boots and a libguestfs appliance: minutes on two busy cores
def test_legacy_guest_boots_on_virtio_only_after_os_adaptation(tmp_path: Path) -> None:
    for tool in ("qemu-system-x86_64", "nbdkit", "guestfish"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    guest = legacy_guest()
    server = start_migration_server(tmp_path)
    agent = None
    data = ["--data-dir", str(server.data_dir)]
    background: list[subprocess.Popen[str]] = []
    try:
        agent, source_id = register(server, [guest.disk], tmp_path / "agent")

        # Adaptation off: the image is the source's bytes; SATA boots it, virtio does not (no driver in the initramfs).
        plain, detail = _migrate(server, source_id, "plain", "--ReplicationParameters", '{"os_adaptation": false}')
        assert "os_adaptation" not in detail
        plain_chunks = store(server).get(plain).disks[0].chunk_hexes()
        # Both boot tests of the plain image run while the adapted image is made: each is one TCG
        # vCPU for a minute or more, and the two cores have room for them beside the adaptation.
        sata_boot = _image_started("boot-test", plain, *data, "--bus", "sata", "--timeout", "480")
        virtio_boot = _image_started("boot-test", plain, *data, "--bus", "virtio", "--timeout", "480")
        background += [sata_boot, virtio_boot]

        # Adaptation on (the default), to a 20 GiB disk: a new image from the chunks libguestfs changed.
        adapted, detail = _migrate(server, source_id, "adapted", "--SystemDiskSize", "20")

        sata = _finished(sata_boot)
        assert sata.returncode == 0, sata.stdout + sata.stderr
        virtio = _finished(virtio_boot)
        assert virtio.returncode == 1, virtio.stdout + virtio.stderr
        assert f"FAILED: {plain} disk 0: stage initramfs" in virtio.stdout, virtio.stdout
        assert "did not find the root file system" in virtio.stdout

        record = detail["os_adaptation"]
        assert isinstance(record, dict) and record["adapted"] is True, record
        assert record["image_id"] == adapted and record["guest"].startswith("debian 12"), record
        assert 0 < record["changed_chunks"] < 20 * GiB // 16384 // 10, record  # the rest is shared
        assert not detail["StatusInfo"], detail  # no warning on the job
        log = Path(record["log"])
        assert log.parent == server.data_dir / "os-adaptation" / adapted
        text = log.read_text()
        for expected in (
            "added virtio_blk", "ran: update-initramfs -u -k all", "/etc/fstab: /dev/sda1 (/) -> UUID=",
            "root=/dev/sda1 -> root=UUID=", "removed /etc/udev/rules.d/70-persistent-net.rules",
            "/dev/sda1 grew from", "the ext4 file system on /dev/sda1 grew with it",
            "changed: /etc/network/interfaces: the source's NIC eth0 (inet static 10.20.30.40/24, gateway "
            "10.20.30.1) commented out; the first Ethernet NIC, whatever its name, does DHCP",
            "changed: /etc/netplan/50-cloud-init.yaml: the source's NIC eth0 (DHCP; match macaddress "
            "00:0c:29:3a:5b:7c; set-name eth0) replaced by zz-opensmc-kvm",
        ):  # fmt: skip
            assert expected in text, text
        assert "failed:" not in text, text
        print(text)  # the adaptation log, with its time (-s shows it)
        shown = json.loads(_image("show", adapted, "--json", *data).stdout)
        (adaptation,) = shown["OsAdaptation"]
        assert adaptation["Adapted"] is True and adaptation["Log"] == str(log)
        assert "Adaptation:   adapted (disk 0)" in _image("show", adapted, *data).stdout
        # The image without adaptation is untouched (images are immutable).
        assert store(server).get(plain).disks[0].chunk_hexes() == plain_chunks

        # The last partition and its ext4 fill the 20 GiB disk.
        disk = store(server).get(adapted).disks[0].index
        head = store(server).read_chunk(disk.hash_at(0))  # type: ignore[arg-type]
        start = int.from_bytes(head[446 + 8 : 446 + 12], "little")
        sectors = int.from_bytes(head[446 + 12 : 446 + 16], "little")
        assert disk.size == 20 * GiB and (start + sectors) * 512 == 20 * GiB, (start, sectors)
        superblock = store(server).read_chunk(disk.hash_at(start * 512 // 16384))  # type: ignore[arg-type]
        sb = superblock[1024 : 1024 + 1024]
        blocks, log_block = int.from_bytes(sb[4:8], "little"), int.from_bytes(sb[24:28], "little")
        assert blocks * (1024 << log_block) > 19 * GiB, blocks

        # In the adapted guest: the first NIC does DHCP, the original config is kept as its backup.
        raw = tmp_path / "adapted.raw"
        store(server).export(adapted, 0, "raw", raw)
        fs = f"{raw}?offset={start * 512}"
        interfaces = _debugfs_cat(fs, "/etc/network/interfaces")
        active = [w.strip() for w in interfaces.splitlines() if w.strip() and not w.lstrip().startswith("#")]
        assert active[-2:] == ["auto type/1/1=opensmc0", "iface opensmc0 inet dhcp"], interfaces
        assert not any("eth0" in line for line in active), interfaces
        assert _debugfs_cat(fs, "/var/backups/opensmc-kvm/etc/network/interfaces") == LEGACY_INTERFACES
        raw.unlink()

        booted = _image("boot-test", adapted, *data, "--bus", "virtio", "--timeout", "480")
        assert booted.returncode == 0, booted.stdout + booted.stderr
        assert f"PASSED: {adapted} disk 0: the system reached a login prompt" in booted.stdout
    finally:
        for proc in background:
            _kill(proc)
        if agent is not None:
            agent.stop()
        stop(server.proc)


def test_an_adaptation_that_cannot_run_leaves_the_image_unadapted_with_a_warning(tmp_path: Path) -> None:
    """No libguestfs on the server: the job still finishes, its image is the source's bytes, StatusInfo says why."""
    tools = {name: shutil.which(name) for name in ("qemu-img", "nbdkit")}
    if None in tools.values():
        pytest.skip("qemu-img and nbdkit are needed")
    guest = legacy_guest()
    bin_dir = tmp_path / "bin"  # a PATH with qemu-img and nbdkit but no guestfish
    bin_dir.mkdir()
    for name, path in tools.items():
        (bin_dir / name).symlink_to(str(path))
    server = start_migration_server(tmp_path, extra_env={"PATH": str(bin_dir)})
    agent = None
    try:
        agent, source_id = register(server, [guest.disk], tmp_path / "agent")
        image_id, detail = _migrate(server, source_id, "nolibguestfs")
        info = json.loads(str(detail["StatusInfo"]))
        assert info["error_code"] == "OsAdaptation.NotAdapted", info
        assert f"The image {image_id} is not adapted for KVM" in info["error_msg"]
        assert "install the Debian package libguestfs-tools" in info["error_msg"], info
        record = detail["os_adaptation"]
        assert isinstance(record, dict) and record["adapted"] is False and record["image_id"] == image_id
        shown = _image("show", image_id, "--data-dir", str(server.data_dir))
        assert "Adaptation:   NOT adapted (disk 0)" in shown.stdout, shown.stdout
        assert store(server).list_images() == [image_id]  # the temporary snapshot is gone
        assert store(server).get(image_id).disks[0].size == guest.size
    finally:
        if agent is not None:
            agent.stop()
        stop(server.proc)
