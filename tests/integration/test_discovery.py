"""What the agent discovers: the real machine (types only), fake /proc and /sys trees, and disk images."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from opensmc.agent.discovery import (
    MAX_DATA_DISKS,
    DiskFacts,
    PartFacts,
    SystemFacts,
    discover_disks,
    discover_system,
    kernel_level,
    to_report,
)

MIB = 1 << 20
GIB = 1 << 30

needs_sfdisk = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk not installed")
needs_mkfs = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 not installed")

SYSTEM_INFO_KEYS = {"agent_mode", "agent_type", "client_type", "hostname", "ipv4", "ipv6", "cores",
                    "cpu_usage", "memory", "memory_usage"}


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def partition(path: Path, script: str) -> None:
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path)],
                   input=script, text=True, check=True, capture_output=True)


def mkfs_at(image: Path, offset: int, size: int, kind: str = "ext4") -> None:
    fs = sparse(image.with_name(f"{image.name}.{offset}.fs"), size)
    subprocess.run([f"mkfs.{kind}", "-F", "-q", str(fs)], check=True, capture_output=True)
    subprocess.run(["dd", f"if={fs}", f"of={image}", "bs=1M", f"seek={offset // MIB}", "conv=notrunc,sparse",
                    "status=none"], check=True)
    fs.unlink()


# -- system ----------------------------------------------------------------------------------------------


def test_real_machine_system_facts(tmp_path: Path) -> None:
    s = discover_system(tmp_path / "state", cpu_sample=0.05)
    assert isinstance(s, SystemFacts)
    assert s.hostname and isinstance(s.hostname, str)
    assert s.platform and isinstance(s.platform, str)
    assert re.fullmatch(r"[0-9a-f]{32}", s.machine_id)
    assert isinstance(s.kernel_level, int) and s.kernel_level >= 200
    assert s.architecture and s.architecture != "aarch64"
    assert s.cores >= 1
    assert s.memory_bytes > 0
    assert re.fullmatch(r"\d+\.\d\d", s.memory)
    for frac in (s.cpu_usage, s.memory_usage):
        assert re.fullmatch(r"[01]\.\d\d", frac)
        assert 0.0 <= float(frac) <= 1.0
    assert all(isinstance(a, str) and ":" not in a for a in s.ipv4)
    assert all(isinstance(a, str) and ":" in a for a in s.ipv6)
    assert s.machine_id == discover_system(tmp_path / "state", cpu_sample=0).machine_id


@pytest.mark.parametrize(
    ("release", "level"),
    [("5.15.0-105-generic", 515), ("6.1.0-18-amd64", 601), ("3.10.0-1160.el7.x86_64", 310),
     ("4.19.283", 419), ("2.6.32", 206), ("garbage", 0)],
)
def test_kernel_level(release: str, level: int) -> None:
    assert kernel_level(release) == level


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.0.0.0/24 2 0 2
        |-- 10.0.0.0
           /24 link UNICAST
        |-- 10.0.0.5
           /32 host LOCAL
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
        |-- 10.0.0.5
           /32 host LOCAL
        |-- 192.168.1.7
           /32 host LOCAL
"""

IF_INET6 = """00000000000000000000000000000001 01 80 10 80       lo
fe800000000000000000000000000001 02 40 20 80     eth0
20010db8000000000000000000000042 02 40 00 80     eth0
"""


def fake_proc_root(root: Path, *, machine_id: str | None) -> Path:
    files = {
        "etc/os-release": 'NAME="Ubuntu"\nVERSION_ID="22.04"\nID=ubuntu\nPRETTY_NAME="Ubuntu 22.04.4 LTS"\n',
        "proc/sys/kernel/osrelease": "5.15.0-105-generic\n",
        "proc/sys/kernel/hostname": "web-1\n",
        "proc/cpuinfo": "".join(f"processor\t: {i}\nmodel name\t: x\n\n" for i in range(4)),
        "proc/meminfo": "MemTotal: 1048576 kB\nMemFree: 100000 kB\nMemAvailable: 786432 kB\n",
        "proc/stat": "cpu  100 0 100 600 200 0 0 0 0 0\ncpu0 100 0 100 600 200 0 0 0 0 0\n",
        "proc/net/fib_trie": FIB_TRIE,
        "proc/net/if_inet6": IF_INET6,
    }
    if machine_id is not None:
        files["etc/machine-id"] = machine_id + "\n"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_system_facts_from_a_fake_root(tmp_path: Path) -> None:
    root = fake_proc_root(tmp_path / "root", machine_id="0123456789abcdef0123456789abcdef")
    s = discover_system(tmp_path / "state", root=root, cpu_sample=0)
    assert (s.platform, s.os_id, s.os_version, s.os_pretty_name) == ("Ubuntu", "ubuntu", "22.04",
                                                                     "Ubuntu 22.04.4 LTS")
    assert (s.hostname, s.kernel_release, s.kernel_level) == ("web-1", "5.15.0-105-generic", 515)
    assert s.machine_id == "0123456789abcdef0123456789abcdef"
    assert s.cores == 4
    assert (s.memory_bytes, s.memory, s.memory_usage) == (GIB, "1.00", "0.25")
    assert s.cpu_usage == "0.20"  # busy 200 of 1000 jiffies; iowait counts as idle
    assert s.ipv4 == ["10.0.0.5", "192.168.1.7"]
    assert s.ipv6 == ["2001:db8::42"]
    assert not (tmp_path / "state").exists()  # a real machine-id needs no state


def test_machine_id_is_generated_once_and_kept(tmp_path: Path) -> None:
    root = fake_proc_root(tmp_path / "root", machine_id=None)
    first = discover_system(tmp_path / "state", root=root, cpu_sample=0).machine_id
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert (tmp_path / "state" / "machine-id").read_text().strip() == first
    assert discover_system(tmp_path / "state", root=root, cpu_sample=0).machine_id == first


def test_missing_proc_files_degrade_gracefully(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    s = discover_system(tmp_path / "state", root=root, cpu_sample=0)
    assert s.platform == "Others Linux"
    assert (s.memory, s.cpu_usage, s.memory_usage) == ("0.00", "0.00", "0.00")
    assert s.cores >= 1 and s.kernel_release


# -- disks from images -----------------------------------------------------------------------------------


@pytest.fixture
def system_image(tmp_path: Path) -> Path:
    if shutil.which("sfdisk") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("sfdisk or mkfs.ext4 not installed")
    img = sparse(tmp_path / "system.img", 96 * MIB)
    partition(img, "label: gpt\nsize=1MiB, type=21686148-6449-6E6F-744E-656564454649\n"
                   "size=8MiB, type=U\nsize=16MiB, type=L\ntype=L\n")
    mkfs_at(img, 10 * MIB, 16 * MIB)  # partition 3: a separate /boot
    mkfs_at(img, 26 * MIB, 96 * MIB - 26 * MIB - MIB)  # partition 4: root (minus the backup GPT's MiB)
    return img


@pytest.fixture
def data_image(tmp_path: Path) -> Path:
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk not installed")
    img = sparse(tmp_path / "data.img", 64 * MIB)
    partition(img, "label: dos\nstart=2048, size=8MiB, type=83, bootable\nsize=8MiB, type=82\ntype=5\n"
                   "size=10MiB, type=83\ntype=8e\n")
    return img


def test_explicit_images(system_image: Path, data_image: Path, tmp_path: Path) -> None:
    bare = sparse(tmp_path / "bare.img", 10 * MIB + 512)
    disks = discover_disks([str(system_image), str(data_image), str(bare)])
    assert [(d.index, d.path, d.label) for d in disks] == [
        (0, str(system_image), "gpt"), (1, str(data_image), "dos"), (2, str(bare), None)]

    sysd = disks[0]
    assert sysd.size_bytes == 96 * MIB
    assert [p.device for p in sysd.partitions] == ["0_0", "0_1", "0_2", "0_3"]
    assert [p.number for p in sysd.partitions] == [1, 2, 3, 4]
    assert [p.node for p in sysd.partitions] == [f"{system_image}#p{n}" for n in (1, 2, 3, 4)]
    assert [p.path for p in sysd.partitions] == [p.node for p in sysd.partitions]
    assert [p.offset for p in sysd.partitions] == [MIB, 2 * MIB, 10 * MIB, 26 * MIB]
    assert [p.fs_type for p in sysd.partitions] == [None, None, "ext4", "ext4"]
    # BIOS boot and ESP are Boot; the largest Linux filesystem is taken as the root.
    assert [p.type for p in sysd.partitions] == ["Boot", "Boot", "Normal", "System"]
    assert [p.need for p in sysd.partitions] == [True, True, False, True]
    assert all(p.can_block for p in sysd.partitions)

    data = disks[1]
    assert [p.device for p in data.partitions] == ["1_0", "1_1", "1_2", "1_3"]
    assert [p.number for p in data.partitions] == [1, 2, 5, 6]  # the extended container is not listed
    assert [p.offset for p in data.partitions] == [MIB, 9 * MIB, 18 * MIB, 29 * MIB]
    # An MBR active flag off the system disk means nothing.
    assert [p.type for p in data.partitions] == ["Normal"] * 4
    assert not any(p.need for p in data.partitions)

    (whole,) = disks[2].partitions
    assert (whole.device, whole.number, whole.node, whole.offset, whole.size_bytes) == (
        "2_0", 0, str(bare), 0, 10 * MIB + 512)


@needs_mkfs
def test_unpartitioned_system_image_is_one_system_partition(tmp_path: Path) -> None:
    img = sparse(tmp_path / "fs.img", 32 * MIB)
    subprocess.run(["mkfs.ext4", "-F", "-q", str(img)], check=True, capture_output=True)
    (disk,) = discover_disks([str(img)])
    (part,) = disk.partitions
    assert (part.fs_type, part.type, part.need, part.can_block, part.size_bytes) == (
        "ext4", "System", True, True, 32 * MIB)


def test_too_many_disks_is_rejected(tmp_path: Path) -> None:
    paths = [str(sparse(tmp_path / f"d{i}.img", MIB)) for i in range(MAX_DATA_DISKS + 2)]
    assert len(discover_disks(paths[: MAX_DATA_DISKS + 1])) == MAX_DATA_DISKS + 1
    with pytest.raises(ValueError, match="at most 17"):
        discover_disks(paths)
    with pytest.raises(FileNotFoundError):
        discover_disks([str(tmp_path / "missing.img")])


@needs_sfdisk
def test_corrupt_table_is_reported_not_raised(tmp_path: Path) -> None:
    img = sparse(tmp_path / "gpt.img", 16 * MIB)
    partition(img, "label: gpt\nsize=4MiB\n")
    with open(img, "r+b") as fh:
        for off in (512 + 40, 16 * MIB - 512 + 40):
            fh.seek(off)
            fh.write(b"\xff")
    (disk,) = discover_disks([str(img)])
    assert disk.label is None
    assert any("CRC" in w for w in disk.warnings)
    assert len(disk.partitions) == 1 and disk.partitions[0].size_bytes == 16 * MIB


# -- disks from a fake /sys ------------------------------------------------------------------------------


def _sysfs_disk(root: Path, name: str, dev: str, size: int, parts: dict[str, tuple[str, int, int]]) -> None:
    base = root / "sys/block" / name
    (base / "queue").mkdir(parents=True)
    (base / "dev").write_text(dev + "\n")
    (base / "size").write_text(f"{size // 512}\n")
    (base / "queue/logical_block_size").write_text("512\n")
    (root / "sys/class/block").mkdir(parents=True, exist_ok=True)
    os.symlink(base, root / "sys/class/block" / name)
    for pname, (pdev, number, start) in parts.items():
        (base / pname / "holders").mkdir(parents=True)
        (base / pname / "dev").write_text(pdev + "\n")
        (base / pname / "partition").write_text(f"{number}\n")
        (base / pname / "start").write_text(f"{start // 512}\n")
        os.symlink(base / pname, root / "sys/class/block" / pname)


def test_auto_discovery_orders_the_root_disk_first(
    system_image: Path, data_image: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    # /dev/vda is the data disk and /dev/vdb the system disk: the one holding / must become disk 0.
    for src, dst in ((data_image, "vda"), (system_image, "vdb")):
        subprocess.run(["cp", "--sparse=always", str(src), str(root / "dev" / dst)], check=True)
    _sysfs_disk(root, "vda", "252:0", 64 * MIB, {"vda1": ("252:1", 1, MIB), "vda5": ("252:5", 5, 18 * MIB)})
    _sysfs_disk(root, "vdb", "252:16", 96 * MIB, {f"vdb{n}": (f"252:{16 + n}", n, 0) for n in (1, 2, 3, 4)})
    _sysfs_disk(root, "loop0", "7:0", MIB, {})
    _sysfs_disk(root, "dm-0", "253:0", 40 * MIB, {})
    # vdb4 is an LVM PV whose LV (dm-0) is /; vdb3 is /boot, vdb2 /boot/efi; vda1 holds /srv.
    os.symlink(root / "sys/block/dm-0", root / "sys/block/vdb/vdb4/holders/dm-0")
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(
        "22 1 253:0 / / rw,relatime - ext4 /dev/mapper/vg-root rw\n"
        "23 22 252:19 / /boot rw - ext4 /dev/vdb3 rw\n"
        "24 23 252:18 / /boot/efi rw - vfat /dev/vdb2 rw\n"
        "25 22 252:1 / /srv/my\\040data rw - ext4 /dev/vda1 rw\n"
        "26 22 0:40 / /proc rw - proc proc rw\n"
    )
    disks = discover_disks(root=root)
    assert [d.path for d in disks] == [str(root / "dev/vdb"), str(root / "dev/vda")]
    sysd, data = disks
    assert [p.node for p in sysd.partitions] == [str(root / f"dev/vdb{n}") for n in (1, 2, 3, 4)]
    assert [p.path for p in sysd.partitions] == [str(root / "dev/vdb1"), "/boot/efi", "/boot", "/"]
    assert [p.type for p in sysd.partitions] == ["Boot", "Boot", "Boot", "System"]
    assert [p.need for p in sysd.partitions] == [True, True, True, True]
    assert [p.device for p in data.partitions] == ["1_0", "1_1", "1_2", "1_3"]
    assert data.partitions[0].path == "/srv/my data"
    assert data.partitions[0].mount_point == "/srv/my data"
    assert [p.type for p in data.partitions] == ["Normal"] * 4


def test_real_machine_disks_are_sane() -> None:
    disks = discover_disks()
    assert isinstance(disks, list)
    assert [d.index for d in disks] == list(range(len(disks)))
    for d in disks:
        assert isinstance(d, DiskFacts)
        assert d.size_bytes >= 0 and d.sector_size in (512, 1024, 2048, 4096)
        assert d.partitions
        for p in d.partitions:
            assert isinstance(p, PartFacts)
            assert p.device.startswith(f"{d.index}_")
            assert p.type in ("System", "Boot", "Normal")
            assert p.offset >= 0 and p.size_bytes >= 0
    json.dumps(to_report(discover_system(Path("/nonexistent-state"), cpu_sample=0), disks))


# -- report ----------------------------------------------------------------------------------------------


def _facts(**overrides: object) -> SystemFacts:
    base: dict[str, object] = dict(
        machine_id="0" * 32, hostname="web-1", platform="Ubuntu", os_id="ubuntu", os_version="22.04",
        os_pretty_name="Ubuntu 22.04.4 LTS", kernel_release="5.15.0-105-generic", kernel_level=515,
        architecture="x86_64", cores=4, memory_bytes=GIB, memory="1.00", cpu_usage="0.12",
        memory_usage="0.25", ipv4=["10.0.0.5"], ipv6=["2001:db8::42"],
    )
    base.update(overrides)
    return SystemFacts(**base)  # type: ignore[arg-type]


def test_report_is_json_and_system_info_matches_smc(system_image: Path, data_image: Path) -> None:
    disks = discover_disks([str(system_image), str(data_image)])
    report = to_report(_facts(), disks)
    text = json.dumps(report)
    assert json.loads(text) == report
    assert report["system_disk_size"] == 1  # 96 MiB rounds up to 1 GiB
    assert report["kernel_level"] == 515 and report["platform"] == "Ubuntu"
    info = json.loads(report["system_info"])
    assert set(info) == SYSTEM_INFO_KEYS
    assert all(isinstance(v, str) for v in info.values())
    assert info == {"agent_mode": "daemon", "agent_type": "opensmc", "client_type": "", "cores": "4",
                    "cpu_usage": "0.12", "hostname": "web-1", "ipv4": "10.0.0.5", "ipv6": "2001:db8::42",
                    "memory": "1.00", "memory_usage": "0.25"}
    assert [d["index"] for d in report["disks"]] == [0, 1]
    part = report["disks"][0]["parts"][3]
    assert set(part) == {"device", "number", "path", "node", "mount_point", "offset", "size_bytes", "fs_type",
                         "part_type", "name", "can_block", "need", "type"}
    assert (part["device"], part["type"], part["need"]) == ("0_3", "System", True)


def test_system_info_stays_within_1kb() -> None:
    many = _facts(ipv4=[f"10.0.{i // 256}.{i % 256}" for i in range(300)],
                  ipv6=[f"2001:db8::{i:x}" for i in range(300)])
    info = to_report(many, [])["system_info"]
    assert len(info.encode()) <= 1024
    parsed = json.loads(info)
    assert set(parsed) == SYSTEM_INFO_KEYS
    assert parsed["ipv4"].startswith("10.0.0.0,")  # addresses are dropped from the end, IPv6 first
