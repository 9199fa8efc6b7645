"""What the agent learns about its own machine: OS, CPU, memory, addresses, disks.

Linux only, standard library only, no dependency on the server code. Every
function reads the live system through ``root`` (default ``/``: ``/proc``,
``/sys``, ``/etc``), so tests can point it at a fake tree.

Report layout (:func:`to_report`): the agent POSTs this dict at registration
and with every heartbeat. Keys are snake_case; the server maps them onto the
SMC ``DescribeSourceServers`` shapes::

    {
      "report_version": 1,
      "machine_id": "4f1c...",             # stable identity (/etc/machine-id or state dir)
      "hostname": "web-1",
      "platform": "Ubuntu",                # -> Platform (os-release NAME)
      "os_id": "ubuntu", "os_version": "22.04", "os_pretty_name": "Ubuntu 22.04.4 LTS",
      "kernel_release": "5.15.0-105-generic",
      "kernel_level": 515,                 # -> KernelLevel: major*100 + minor
      "architecture": "x86_64",            # -> Architecture (x86_64, arm64, i386, ...)
      "cores": 4, "memory_bytes": 8326479872,
      "ipv4": ["10.0.0.5"], "ipv6": ["fd00::5"],
      "system_info": "{\\"agent_mode\\":\\"daemon\\",...}",   # -> SystemInfo (JSON string, <= 1 KB)
      "system_disk_size": 20,              # -> SystemDiskSize: GiB, rounded up
      "disks": [                           # index 0 = system disk, then data disks 1..16
        {"index": 0, "path": "/dev/vda", "size_bytes": 21474836480, "size_gib": 20,
         "sector_size": 512, "label": "gpt",   # label: "gpt", "dos" or null
         "warnings": [],                        # table problems worked around or reported
         "parts": [
           {"device": "0_0", "number": 1, "path": "/boot/efi", "node": "/dev/vda1",
            "mount_point": "/boot/efi", "offset": 1048576, "size_bytes": 104857600,
            "fs_type": "vfat", "part_type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "name": "",
            "can_block": true, "need": true, "type": "Boot"}, ...]}, ...]
    }

Mapping: ``disks[0].parts`` -> ``SystemDiskParts`` and ``Disks.System``
(``Size`` = ``size_bytes``; ``Offset`` = first partition's ``offset``);
``disks[1:]`` -> ``DataDisks`` (``Index``, ``Path``, ``Size`` in GiB) and
``Disks.Data``. Part fields: ``device`` -> ``Device``, ``path`` -> ``Path``,
``size_bytes`` -> ``SizeBytes``, ``can_block`` -> ``CanBlock``, ``need`` ->
``Need``, ``type`` -> ``Type``.

Choices made here:

- ``KernelLevel`` is ``major * 100 + minor`` of the kernel release (5.15 -> 515,
  6.1 -> 601, 3.10 -> 310): an integer that orders releases, since Linux minors
  stay below 100.
- Partition device ids are ``"<diskIndex>_<n>"`` with ``n`` counting the disk's
  data-holding partitions from 0 in table order (``0_0``, ``0_1``, ``1_0``), as
  SMC names them. MBR extended containers are not listed.
- ``type`` is ``System`` for the partition holding ``/``; ``Boot`` for ``/boot``,
  an EFI system partition, a BIOS boot partition or the MBR-active one; else
  ``Normal``. ``need`` is True for System and Boot partitions of the system disk.
  Disk images have no mount points, so there the largest partition with a
  Linux filesystem is taken as System.
"""

import ipaddress
import json
import math
import os
import platform
import re
import shutil
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from opensmc.agent.partitions import (
    Partition,
    PartitionTable,
    PartitionTableError,
    detect_filesystem,
    read_partition_table,
)

__all__ = [
    "MAX_DATA_DISKS",
    "DiskFacts",
    "PartFacts",
    "SystemFacts",
    "discover_disks",
    "discover_system",
    "kernel_level",
    "system_info",
    "to_report",
]

#: SMC numbers data disks 1..16.
MAX_DATA_DISKS = 16
#: SMC's limit on the serialised SystemInfo string.
SYSTEM_INFO_MAX_BYTES = 1024
REPORT_VERSION = 1
_GIB = 1 << 30

_ESP_TYPES = frozenset({"C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "ef"})
_BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
_LINUX_ROOT_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs"})
# Virtual or removable devices that never hold a server's data.
_SKIP_BLOCK_PREFIXES = ("loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd")


class SystemFacts(NamedTuple):
    """The machine as SMC's SystemInfo, Platform, KernelLevel and Architecture describe it."""

    machine_id: str
    hostname: str
    platform: str  #: os-release NAME, e.g. "Ubuntu", "Debian GNU/Linux"
    os_id: str  #: os-release ID, e.g. "ubuntu"
    os_version: str  #: os-release VERSION_ID, e.g. "22.04"
    os_pretty_name: str
    kernel_release: str  #: e.g. "6.1.0-18-amd64"
    kernel_level: int  #: major*100 + minor
    architecture: str  #: "x86_64", "arm64", ...
    cores: int
    memory_bytes: int
    memory: str  #: GiB with 2 decimals, e.g. "1.00"
    cpu_usage: str  #: busy fraction with 2 decimals, e.g. "0.12"
    memory_usage: str  #: used fraction (1 - MemAvailable/MemTotal), 2 decimals
    ipv4: "list[str]" = []
    ipv6: "list[str]" = []


class PartFacts(NamedTuple):
    """One partition (or the whole disk, for a disk without a partition table)."""

    device: str  #: "<diskIndex>_<n>", n counting from 0
    number: int  #: partition number (sda<number>); 0 for a whole-disk pseudo-partition
    path: str  #: mount point if mounted, else node
    node: str  #: /dev/vda1, or "<image>#p<number>", or the disk itself for a pseudo-partition
    mount_point: "str | None"
    offset: int  #: bytes from the start of the disk
    size_bytes: int
    fs_type: "str | None"
    part_type: str  #: GPT type GUID or MBR type hex ("83"); "" for a pseudo-partition
    name: str  #: GPT partition name
    can_block: bool  #: its bytes are readable, so block replication can copy it
    need: bool  #: must be migrated (System/Boot of the system disk)
    type: str  #: "System", "Boot" or "Normal"


class DiskFacts(NamedTuple):
    """A disk: index 0 is the system disk, 1..16 data disks."""

    index: int  # type: ignore[assignment]  # a field named like tuple.index: fine at run time
    path: str  #: block device or image file
    size_bytes: int
    sector_size: int
    label: "str | None"  #: "gpt", "dos", or None without a partition table
    partitions: "list[PartFacts]" = []
    warnings: "list[str]" = []


# -- system ------------------------------------------------------------------------------------------------


def discover_system(state_dir: "Path", *, root: "Path" = Path("/"), cpu_sample: float = 0.1) -> "SystemFacts":
    """Facts about this machine. ``state_dir`` keeps a generated machine id when /etc has none.

    ``cpu_sample`` is how long (seconds) to watch /proc/stat for cpu_usage; 0
    gives the average since boot.
    """
    osr = _os_release(root)
    release = _read(root / "proc/sys/kernel/osrelease").strip() or platform.release()
    mem_total, mem_avail = _meminfo(root)
    v4, v6 = _addresses(root)
    return SystemFacts(
        machine_id=_machine_id(root, state_dir),
        hostname=_read(root / "proc/sys/kernel/hostname").strip() or socket.gethostname(),
        platform=osr.get("NAME") or "Others Linux",
        os_id=osr.get("ID", ""),
        os_version=osr.get("VERSION_ID", ""),
        os_pretty_name=osr.get("PRETTY_NAME", ""),
        kernel_release=release,
        kernel_level=kernel_level(release),
        architecture=_architecture(platform.machine()),
        cores=_cores(root),
        memory_bytes=mem_total,
        memory=f"{mem_total / _GIB:.2f}",
        cpu_usage=f"{_cpu_usage(root, cpu_sample):.2f}",
        memory_usage=f"{(1 - mem_avail / mem_total) if mem_total else 0.0:.2f}",
        ipv4=v4,
        ipv6=v6,
    )


def kernel_level(release: str) -> int:
    """``major*100 + minor`` of a kernel release string ("5.15.0-105-generic" -> 515); 0 if unparsable."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return int(m[1]) * 100 + int(m[2]) if m else 0


def _read(path: "Path") -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _os_release(root: "Path") -> "dict[str, str]":
    text = _read(root / "etc/os-release") or _read(root / "usr/lib/os-release")
    out: "dict[str, str]" = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            out[key.strip()] = value
    return out


def _machine_id(root: "Path", state_dir: "Path") -> str:
    mid = _read(root / "etc/machine-id").strip()
    if re.fullmatch(r"[0-9a-f]{32}", mid):
        return mid
    # No systemd machine id (containers, minimal images): keep our own so
    # re-registration after a restart is recognised as the same server.
    kept = state_dir / "machine-id"
    mid = _read(kept).strip()
    if re.fullmatch(r"[0-9a-f]{32}", mid):
        return mid
    mid = uuid.uuid4().hex
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = kept.with_suffix(".tmp")
    tmp.write_text(mid + "\n", encoding="ascii")
    os.replace(tmp, kept)
    return mid


def _architecture(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "aarch64": "arm64", "i486": "i386", "i586": "i386", "i686": "i386"}.get(m, m)


def _cores(root: "Path") -> int:
    n = sum(1 for line in _read(root / "proc/cpuinfo").splitlines() if re.match(r"processor\s*:", line))
    return n or os.cpu_count() or 1


def _meminfo(root: "Path") -> "tuple[int, int]":
    """(MemTotal, MemAvailable) in bytes; (0, 0) without /proc/meminfo."""
    values: "dict[str, int]" = {}
    for line in _read(root / "proc/meminfo").splitlines():
        m = re.match(r"(\w+):\s+(\d+)", line)
        if m:
            values[m[1]] = int(m[2]) * 1024  # /proc/meminfo says kB, meaning KiB
    total = values.get("MemTotal", 0)
    avail = values.get("MemAvailable", values.get("MemFree", 0) + values.get("Cached", 0))
    return total, min(avail, total)


def _cpu_times(root: "Path") -> "tuple[int, int]":
    """(idle, total) jiffies from the aggregate line of /proc/stat."""
    for line in _read(root / "proc/stat").splitlines():
        if line.startswith("cpu "):
            nums = [int(x) for x in line.split()[1:] if x.isdigit()]
            # guest and guest_nice (fields 9, 10) are already counted in user and nice.
            nums = nums[:8]
            idle = sum(nums[3:5])  # idle + iowait
            return idle, sum(nums)
    return 0, 0


def _cpu_usage(root: "Path", sample: float) -> float:
    idle0, total0 = _cpu_times(root)
    if sample > 0:
        time.sleep(sample)
        idle1, total1 = _cpu_times(root)
        if total1 > total0:
            idle0, total0 = idle1 - idle0, total1 - total0
    if total0 <= 0:
        return 0.0
    return min(max(1 - idle0 / total0, 0.0), 1.0)


def _addresses(root: "Path") -> "tuple[list[str], list[str]]":
    v4 = _ipv4_from_fib_trie(_read(root / "proc/net/fib_trie"))
    v6 = _ipv6_from_if_inet6(_read(root / "proc/net/if_inet6"))
    if not v4 and not v6 and root == Path("/"):
        v4, v6 = _addresses_from_ip()
    return v4, v6


def _ipv4_from_fib_trie(text: str) -> "list[str]":
    # In the Local table each address of this host is a leaf followed by "/32 host LOCAL".
    found: "list[str]" = []
    last = ""
    for line in text.splitlines():
        m = re.search(r"[|+]-- (\d+\.\d+\.\d+\.\d+)", line)
        if m:
            last = m[1]
        elif "/32 host LOCAL" in line and last and not last.startswith("127."):
            if last not in found:
                found.append(last)
    return found


def _ipv6_from_if_inet6(text: str) -> "list[str]":
    found: "list[str]" = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 6 or len(cols[0]) != 32:
            continue
        # Only global scope (0x00): link-local and loopback addresses mean nothing off this host.
        if cols[3] != "00":
            continue
        try:
            addr = str(ipaddress.IPv6Address(bytes.fromhex(cols[0])))
        except ValueError:
            continue
        if addr not in found:
            found.append(addr)
    return found


def _addresses_from_ip() -> "tuple[list[str], list[str]]":
    ip = shutil.which("ip")
    if ip is None:
        return [], []
    try:
        out = subprocess.run(
            [ip, "-j", "addr"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True, timeout=5
        ).stdout.decode("utf-8", "replace")
        data = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return [], []
    v4: "list[str]" = []
    v6: "list[str]" = []
    for iface in data if isinstance(data, list) else []:
        for a in iface.get("addr_info", []) if isinstance(iface, dict) else []:
            if not isinstance(a, dict) or a.get("scope") != "global":
                continue
            target = v4 if a.get("family") == "inet" else v6 if a.get("family") == "inet6" else None
            local = a.get("local")
            if target is not None and isinstance(local, str) and local not in target:
                target.append(local)
    return v4, v6


# -- disks -------------------------------------------------------------------------------------------------


class _Mount(NamedTuple):
    dev: str  #: "major:minor"
    point: str
    source: str  #: the mount source as written, e.g. /dev/vda1


def discover_disks(explicit: "Sequence[str] | None" = None, *, root: "Path" = Path("/")) -> "list[DiskFacts]":
    """The disks to migrate: ``explicit`` paths in order (first = system disk), else the machine's disks.

    Explicit paths may be image files or block devices; more than one system
    disk plus :data:`MAX_DATA_DISKS` is a ``ValueError`` and a path that does not
    exist a ``FileNotFoundError``. An existing disk that cannot be read (no
    permission) is still listed, with ``can_block=False`` and a warning. Without them, disks
    come from ``/sys/block`` (virtual devices skipped) and the one holding ``/``
    becomes disk 0.
    """
    mounts = _mounts(root)
    if explicit:
        if len(explicit) > 1 + MAX_DATA_DISKS:
            raise ValueError(f"at most {1 + MAX_DATA_DISKS} disks (1 system + {MAX_DATA_DISKS} data)")
        for p in explicit:
            os.stat(p)  # a mistyped --disk must fail loudly, not become an empty disk
        sys_names = [_sys_block_name(root, p) for p in explicit]
        paths = list(explicit)
    else:
        found = _sys_block_disks(root)
        names = [name for name, _ in found]
        paths = [dev for _, dev in found]
        root_disk = _disk_of_mount(root, names, mounts, "/")
        sys_names = list(names)
        if root_disk is not None:
            i = names.index(root_disk)
            sys_names.insert(0, sys_names.pop(i))
            paths.insert(0, paths.pop(i))
        del sys_names[1 + MAX_DATA_DISKS :], paths[1 + MAX_DATA_DISKS :]
    return [_disk_facts(root, i, p, n, mounts) for i, (p, n) in enumerate(zip(paths, sys_names))]


def _sys_block_disks(root: "Path") -> "list[tuple[str, str]]":
    """(name, /dev node) of real disks with a non-zero size, sorted by name."""
    out: "list[tuple[str, str]]" = []
    try:
        names = sorted(os.listdir(root / "sys/block"))
    except OSError:
        return out
    for name in names:
        if name.startswith(_SKIP_BLOCK_PREFIXES):
            continue
        if _int(_read(root / "sys/block" / name / "size")) <= 0:
            continue
        out.append((name, str(root / "dev" / name)))
    return out


def _sys_block_name(root: "Path", path: str) -> "str | None":
    """The /sys/block name of a block-device path, None for image files."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    link = root / "sys/dev/block" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    try:
        return Path(os.path.realpath(link)).name
    except OSError:
        return None


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return 0


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), s)


def _mounts(root: "Path") -> "list[_Mount]":
    mounts: "list[_Mount]" = []
    for line in _read(root / "proc/self/mountinfo").splitlines():
        left, sep, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        if sep and len(f) >= 5 and len(r) >= 2:
            mounts.append(_Mount(f[2], _unescape(f[4]), _unescape(r[1])))
    return mounts


def _block_names(root: "Path", disk: str) -> "dict[str, str]":
    """major:minor -> name for a disk and its partitions, plus whatever sits on them (dm, md)."""
    base = root / "sys/block" / disk
    names = {disk: _read(base / "dev").strip()}
    try:
        for child in os.listdir(base):
            if child.startswith(disk) and (base / child / "partition").exists():
                names[child] = _read(base / child / "dev").strip()
    except OSError:
        pass
    return {dev: name for name, dev in names.items() if dev}


def _holders(root: "Path", name: str) -> "list[str]":
    """Devices built on ``name`` (LVM, RAID, crypt), recursively."""
    out: "list[str]" = []
    todo = [name]
    while todo and len(out) < 64:
        cur = todo.pop()
        try:
            kids = os.listdir(root / "sys/class/block" / cur / "holders")
        except OSError:
            continue
        for k in kids:
            if k not in out:
                out.append(k)
                todo.append(k)
    return out


def _mount_points(root: "Path", name: str, mounts: "list[_Mount]") -> "list[str]":
    """Mount points of block device ``name`` or of anything stacked on it."""
    names = [name, *_holders(root, name)]
    devs = {_read(root / "sys/class/block" / n / "dev").strip() for n in names} - {""}
    points: "list[str]" = []
    for m in mounts:
        src = os.path.basename(os.path.realpath(m.source)) if m.source.startswith("/dev/") else ""
        if (m.dev in devs or src in names) and m.point not in points:
            points.append(m.point)
    return points


def _disk_of_mount(root: "Path", disks: "list[str]", mounts: "list[_Mount]", point: str) -> "str | None":
    for disk in disks:
        for name in _block_names(root, disk).values():
            if point in _mount_points(root, name, mounts):
                return disk
    return None


def _node_name(disk: str, number: int) -> str:
    # Kernel naming: sda1, vda1, but nvme0n1p1 and mmcblk0p1 (disk name ends in a digit).
    return f"{disk}{'p' if disk[-1:].isdigit() else ''}{number}"


def _disk_facts(root: "Path", index: int, path: str, sys_name: "str | None", mounts: "list[_Mount]") -> "DiskFacts":
    sector = _int(_read(root / "sys/block" / sys_name / "queue/logical_block_size")) if sys_name else 0
    warnings: "list[str]" = []
    readable = True
    try:
        table = read_partition_table(path, sector_size=sector or None)
    except PartitionTableError as e:
        table = PartitionTable(None, sector or 512, _device_size(root, path, sys_name))
        warnings.append(str(e))
    except OSError as e:
        # Not readable (no root?): sysfs still gives the layout, but nothing can be copied.
        readable = False
        table = _table_from_sysfs(root, sys_name, sector or 512)
        warnings.append(f"cannot read {path}: {e.strerror or e}")
    warnings.extend(table.warnings)

    raw_parts = [p for p in table.partitions if not p.container]
    if not raw_parts:
        fs = _safe_fs(path) if readable else None
        raw_parts = [Partition(0, 0, table.disk_size, "", fs_type=fs)]
    parts: "list[PartFacts]" = []
    for n, p in enumerate(raw_parts):
        if sys_name:
            kname = sys_name if p.index == 0 else _node_name(sys_name, p.index)
            node = str(root / "dev" / kname)
            points = _mount_points(root, kname, mounts)
        else:
            node = path if p.index == 0 else f"{path}#p{p.index}"
            points = []
        mount = _preferred_mount(points)
        kind = _part_type(p, points, index == 0)
        parts.append(
            PartFacts(
                device=f"{index}_{n}",
                number=p.index,
                path=mount or node,
                node=node,
                mount_point=mount,
                offset=p.start,
                size_bytes=p.size,
                fs_type=p.fs_type,
                part_type=p.type,
                name=p.name,
                can_block=readable and p.size > 0,
                need=False,
                type=kind,
            )
        )
    if index == 0:
        if not any(p.type == "System" for p in parts) and not any(p.mount_point for p in parts):
            parts = _guess_system(parts)
        parts = [p._replace(need=p.type in ("System", "Boot")) for p in parts]
    return DiskFacts(index, path, table.disk_size, table.sector_size, table.label, parts, warnings)


def _safe_fs(path: str) -> "str | None":
    try:
        return detect_filesystem(path)
    except OSError:
        return None


def _device_size(root: "Path", path: str, sys_name: "str | None") -> int:
    if sys_name:
        return _int(_read(root / "sys/block" / sys_name / "size")) * 512
    try:
        with open(path, "rb") as fh:
            return fh.seek(0, os.SEEK_END)
    except OSError:
        return 0


def _table_from_sysfs(root: "Path", sys_name: "str | None", sector: int) -> "PartitionTable":
    # sysfs start/size are always in 512-byte units, whatever the logical sector size.
    if sys_name is None:
        return PartitionTable(None, sector, 0)
    base = root / "sys/block" / sys_name
    parts: "list[Partition]" = []
    try:
        children = sorted(os.listdir(base))
    except OSError:
        children = []
    for child in children:
        number = _int(_read(base / child / "partition"))
        if child.startswith(sys_name) and number:
            start = _int(_read(base / child / "start")) * 512
            size = _int(_read(base / child / "size")) * 512
            parts.append(Partition(number, start, size, "", container=size <= 1024))
    parts.sort(key=lambda p: p.index)
    return PartitionTable(None, sector, _int(_read(base / "size")) * 512, parts)


def _preferred_mount(points: "list[str]") -> "str | None":
    # A partition mounted twice (bind mounts) is named by its shortest path: "/" over "/mnt/x".
    return min(points, key=lambda p: (len(p), p)) if points else None


def _part_type(p: "Partition", points: "list[str]", system_disk: bool) -> str:
    if "/" in points:
        return "System"
    if "/boot" in points or "/boot/efi" in points:
        return "Boot"
    # Firmware boots from the system disk only; elsewhere these marks are leftovers.
    mbr_active = p.bootable and 0 < len(p.type) <= 2  # GPT types are GUIDs
    if system_disk and (p.type in _ESP_TYPES or p.type == _BIOS_BOOT_TYPE or mbr_active):
        return "Boot"
    return "Normal"


def _guess_system(parts: "list[PartFacts]") -> "list[PartFacts]":
    """For an image (no mounts): the largest Linux-filesystem partition that is not Boot is System."""
    candidates = [p for p in parts if p.fs_type in _LINUX_ROOT_FS and p.type != "Boot"]
    if not candidates:
        return parts
    best = max(candidates, key=lambda p: p.size_bytes)
    return [p._replace(type="System") if p is best else p for p in parts]


# -- report ------------------------------------------------------------------------------------------------


def to_report(
    system: "SystemFacts",
    disks: "Sequence[DiskFacts]",
    *,
    agent_mode: str = "daemon",
    agent_type: str = "opensmc",
    client_type: str = "",
) -> "dict[str, Any]":
    """The JSON-serialisable registration/heartbeat body; layout in the module docstring."""
    return {
        "report_version": REPORT_VERSION,
        "machine_id": system.machine_id,
        "hostname": system.hostname,
        "platform": system.platform,
        "os_id": system.os_id,
        "os_version": system.os_version,
        "os_pretty_name": system.os_pretty_name,
        "kernel_release": system.kernel_release,
        "kernel_level": system.kernel_level,
        "architecture": system.architecture,
        "cores": system.cores,
        "memory_bytes": system.memory_bytes,
        "ipv4": list(system.ipv4),
        "ipv6": list(system.ipv6),
        "system_info": system_info(system, agent_mode=agent_mode, agent_type=agent_type, client_type=client_type),
        "system_disk_size": _gib_up(disks[0].size_bytes) if disks else 0,
        "disks": [_disk_report(d) for d in disks],
    }


def system_info(system: "SystemFacts", *, agent_mode: str, agent_type: str, client_type: str) -> str:
    """SMC's SystemInfo: compact JSON, string values, at most 1 KB (addresses dropped from the end to fit)."""
    v4, v6 = list(system.ipv4), list(system.ipv6)
    while True:
        info = {
            "agent_mode": agent_mode,
            "agent_type": agent_type,
            "client_type": client_type,
            "cores": str(system.cores),
            "cpu_usage": system.cpu_usage,
            "hostname": system.hostname,
            "ipv4": ",".join(v4),
            "ipv6": ",".join(v6),
            "memory": system.memory,
            "memory_usage": system.memory_usage,
        }
        text = json.dumps(info, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        if len(text.encode()) <= SYSTEM_INFO_MAX_BYTES or not (v4 or v6):
            return text
        (v6 or v4).pop()


def _gib_up(n: int) -> int:
    return math.ceil(n / _GIB)


def _disk_report(d: "DiskFacts") -> "dict[str, Any]":
    return {
        "index": d.index,
        "path": d.path,
        "size_bytes": d.size_bytes,
        "size_gib": _gib_up(d.size_bytes),
        "sector_size": d.sector_size,
        "label": d.label,
        "warnings": list(d.warnings),
        "parts": [
            {
                "device": p.device,
                "number": p.number,
                "path": p.path,
                "node": p.node,
                "mount_point": p.mount_point,
                "offset": p.offset,
                "size_bytes": p.size_bytes,
                "fs_type": p.fs_type,
                "part_type": p.part_type,
                "name": p.name,
                "can_block": p.can_block,
                "need": p.need,
                "type": p.type,
            }
            for p in d.partitions
        ],
    }
