"""A real, small Debian guest disk for boot tests, built once and cached between runs.

:func:`debian_guest` builds a BIOS-bootable disk without loop devices or
mounts: ``debootstrap --variant=minbase`` (plus the kernel and systemd) into
a directory, an ext4 file system made from it with ``mkfs.ext4 -d``, an MBR
partition table written by ``sfdisk``, and GRUB put in place by hand: the
first 440 bytes of GRUB's ``boot.img`` into the MBR and a ``core.img`` from
``grub-mkimage`` into the gap before the first partition (sector 1, where
``boot.img`` looks for it by default). The kernel's console is the serial
port, so a boot test can watch the guest.

The finished disk is kept under ``OPENSMC_GUEST_CACHE`` (default
``/var/tmp/opensmc-guest-cache``), in a folder named by a hash of the recipe:
change the recipe and a new disk is built, rerun and it is reused (a build
takes minutes, a reuse a copy-free path). Builds need root, ``debootstrap``
and a reachable Debian mirror (the one apt uses); otherwise the tests skip,
saying what is missing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

MiB = 1 << 20

#: everything the disk depends on; its hash names the cache folder
RECIPE: dict[str, object] = {
    "version": 3,
    "suite": "bookworm",
    "variant": "minbase",
    "include": ["linux-image-amd64", "systemd-sysv", "udev"],
    "disk_mib": 1024,
    "partition_start_mib": 1,
    "fs_uuid": "5b6c0a6e-2f0b-4a55-9d5e-6f70656e736d",
    "cmdline": "root=UUID=5b6c0a6e-2f0b-4a55-9d5e-6f70656e736d ro console=ttyS0,115200 quiet",
    # kernel modules no boot test needs: about half of the kernel's modules by size
    "prune": [
        "kernel/drivers/gpu", "kernel/drivers/media", "kernel/drivers/net/wireless", "kernel/sound",
        "kernel/drivers/infiniband", "kernel/drivers/staging", "kernel/net/wireless", "kernel/drivers/bluetooth",
        "kernel/drivers/iio", "kernel/drivers/isdn", "kernel/net/bluetooth", "kernel/drivers/hid",
        "kernel/drivers/usb", "kernel/drivers/input/touchscreen", "kernel/drivers/net/ethernet",
    ],
}


LEGACY_INTERFACES = """\
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

# The primary network interface
allow-hotplug eth0
iface eth0 inet static
\taddress 10.20.30.40/24
\tgateway 10.20.30.1
\thwaddress ether 00:0c:29:3a:5b:7c
"""

#: the same guest as a physical machine or another hypervisor leaves it (``legacy_guest``)
LEGACY_RECIPE: dict[str, object] = {
    **RECIPE,
    "root_device": "/dev/sda1",
    "cmdline": "root=/dev/sda1 ro console=ttyS0,115200 quiet",
    # a host-only initramfs (MODULES=list): the drivers of a SATA/IDE machine and ext4, no virtio
    "initramfs_modules": [
        "ahci", "ata_piix", "ata_generic", "sd_mod", "crc64_rocksoft_generic", "crct10dif_generic", "ext4",
        "crc32c_generic",
    ],
    "files": {
        # The old machine's NIC by name, with a static address of its network (ifupdown, Debian's default),
        # and a MAC-bound netplan file as cloud-init writes it: OS adaptation gives the first NIC DHCP in both.
        "etc/network/interfaces": LEGACY_INTERFACES,
        "etc/netplan/50-cloud-init.yaml": (
            "network:\n    version: 2\n    ethernets:\n        eth0:\n            dhcp4: true\n"
            "            match:\n                macaddress: 00:0c:29:3a:5b:7c\n            set-name: eth0\n"
        ),
        "etc/udev/rules.d/70-persistent-net.rules": (
            'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", ATTR{address}=="00:0c:29:3a:5b:7c", '
            'ATTR{type}=="1", KERNEL=="eth*", NAME="eth0"\n'
        ),
    },
}

@dataclass(frozen=True)
class Guest:
    disk: Path
    size: int
    partition_offset: int


def cache_root() -> Path:
    return Path(os.environ.get("OPENSMC_GUEST_CACHE", "/var/tmp/opensmc-guest-cache"))


def recipe_hash(recipe: dict[str, object] | None = None) -> str:
    return hashlib.sha256(json.dumps(RECIPE if recipe is None else recipe, sort_keys=True).encode()).hexdigest()[:16]


def legacy_guest() -> Guest:
    """The guest as a physical machine or an old hypervisor has it: no virtio drivers in its initramfs,
    ``/dev/sda1`` in fstab and on the kernel command line, a persistent-net rule for a NIC it no longer has,
    and that NIC (``eth0``, a static address) in its ifupdown and netplan configs.
    It boots from a SATA or IDE disk and not from a virtio one (until OS adaptation)."""
    return debian_guest(LEGACY_RECIPE)


def _mirror() -> str:
    """The Debian mirror apt uses here (so debootstrap goes where apt-get already goes)."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1 and "security" not in words[1]:
                return words[1]
            if words[:1] == ["deb"] and len(words) > 2 and "security" not in line:
                return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def _run(*cmd: str, cwd: Path | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr[-2000:]}")


def _tool(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/sbin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip(f"{name} is not installed (Debian package {_PACKAGES.get(name, name)})")


_PACKAGES = {"grub-mkimage": "grub-pc-bin", "mkfs.ext4": "e2fsprogs", "sfdisk": "fdisk"}


def debian_guest(recipe: dict[str, object] | None = None) -> Guest:
    """The cached guest disk (read it, never write it: copy it first), building it if needed."""
    recipe = RECIPE if recipe is None else recipe
    root = cache_root() / recipe_hash(recipe)
    disk = root / "disk.img"
    size = int(recipe["disk_mib"]) * MiB  # type: ignore[call-overload]
    offset = int(recipe["partition_start_mib"]) * MiB  # type: ignore[call-overload]
    if (root / "done").exists():
        return Guest(disk, size, offset)
    for name in ("debootstrap", "mkfs.ext4", "sfdisk", "grub-mkimage"):
        _tool(name)
    if not Path("/usr/lib/grub/i386-pc/boot.img").exists():
        pytest.skip("GRUB's BIOS images are not installed (Debian package grub-pc-bin)")
    if os.geteuid() != 0:
        pytest.skip("building the Debian guest needs root (debootstrap)")
    root.mkdir(parents=True, exist_ok=True)
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second test process waits for the first build
        if not (root / "done").exists():
            _build(root, disk, size, offset, recipe)
            (root / "done").write_text(json.dumps(recipe, indent=1))
    return Guest(disk, size, offset)


def _debootstrapped(recipe: dict[str, object]) -> Path:
    """A tar of the debootstrapped tree, shared by every recipe with the same suite and packages."""
    key = {k: recipe[k] for k in ("suite", "variant", "include")}
    tar = cache_root() / f"rootfs-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.tar"
    if tar.exists():
        return tar
    cache_root().mkdir(parents=True, exist_ok=True)
    with tar.with_suffix(".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tar.exists():
            return tar
        tree = tar.with_suffix(".tree")
        shutil.rmtree(tree, ignore_errors=True)
        include = ",".join(recipe["include"])  # type: ignore[arg-type]
        result = subprocess.run(
            [_tool("debootstrap"), f"--variant={recipe['variant']}", f"--include={include}",
             str(recipe["suite"]), str(tree), _mirror()],
            capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )  # fmt: skip
        if result.returncode != 0:
            pytest.skip(f"debootstrap could not build the guest: {result.stdout[-1500:]} {result.stderr[-1500:]}")
        _run("tar", "--numeric-owner", "-cf", str(tar.with_suffix(".tmp")), "-C", str(tree), ".")
        os.replace(tar.with_suffix(".tmp"), tar)
        shutil.rmtree(tree)
    return tar


def _build(root: Path, disk: Path, size: int, offset: int, recipe: dict[str, object]) -> None:
    rootfs = root / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    rootfs.mkdir(parents=True)
    _run("tar", "--numeric-owner", "-xf", str(_debootstrapped(recipe)), "-C", str(rootfs))
    fs_uuid = str(recipe["fs_uuid"])
    root_device = str(recipe.get("root_device") or f"UUID={fs_uuid}")
    (rootfs / "etc/fstab").write_text(f"{root_device} / ext4 errors=remount-ro 0 1\n")
    (rootfs / "etc/hostname").write_text("opensmc-guest\n")
    shadow = rootfs / "etc/shadow"
    shadow.write_text("\n".join(
        "root::" + line.split(":", 2)[2] if line.startswith("root:") else line
        for line in shadow.read_text().splitlines()
    ) + "\n")  # fmt: skip
    modules = next((rootfs / "lib/modules").iterdir())
    for sub in recipe["prune"]:  # type: ignore[attr-defined]
        shutil.rmtree(modules / sub, ignore_errors=True)  # the initramfs was built before: it keeps its own
    if recipe.get("initramfs_modules"):
        conf = rootfs / "etc/initramfs-tools/initramfs.conf"
        conf.write_text(re.sub(r"(?m)^MODULES=.*$", "MODULES=list", conf.read_text()))
        wanted: list[str] = recipe["initramfs_modules"]  # type: ignore[assignment]
        (rootfs / "etc/initramfs-tools/modules").write_text("\n".join(wanted) + "\n")
        _run("chroot", str(rootfs), "update-initramfs", "-u", "-k", "all")
    for name, text in (recipe.get("files") or {}).items():  # type: ignore[attr-defined]
        (rootfs / name).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / name).write_text(text)
    for sub in ("usr/share/doc", "usr/share/man", "usr/share/locale", "var/cache/apt", "var/lib/apt/lists"):
        shutil.rmtree(rootfs / sub, ignore_errors=True)
    kernel = sorted((rootfs / "boot").glob("vmlinuz-*"))[-1].name
    initrd = sorted((rootfs / "boot").glob("initrd.img-*"))[-1].name
    grub = rootfs / "boot/grub"
    shutil.copytree("/usr/lib/grub/i386-pc", grub / "i386-pc", dirs_exist_ok=True)
    (grub / "grub.cfg").write_text(
        "serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n"
        "set timeout=1\n"
        f"menuentry 'Debian (OpenSMC test guest)' {{\n  linux /boot/{kernel} {recipe['cmdline']}\n"
        f"  initrd /boot/{initrd}\n}}\n"
    )
    part = root / "part.img"
    part.unlink(missing_ok=True)
    _run(_tool("mkfs.ext4"), "-q", "-F", "-d", str(rootfs), "-U", fs_uuid, "-L", "root", str(part),
         f"{(size - offset) // 1024}k")  # fmt: skip
    tmp = root / "disk.img.tmp"
    with tmp.open("wb") as f:
        f.truncate(size)
    subprocess.run(
        [_tool("sfdisk"), "-q", str(tmp)], input=f"label: dos\nstart={offset // 512}, type=83, bootable\n",
        text=True, check=True, capture_output=True,
    )  # fmt: skip
    _run("dd", f"if={part}", f"of={tmp}", "bs=1M", f"seek={offset // MiB}", "conv=notrunc,sparse", "status=none")
    core = root / "core.img"
    _run(_tool("grub-mkimage"), "-O", "i386-pc", "-o", str(core), "-p", "(hd0,msdos1)/boot/grub",
         "biosdisk", "part_msdos", "ext2")  # fmt: skip
    core_bytes = core.read_bytes()
    if len(core_bytes) > offset - 512:
        raise RuntimeError(f"core.img is {len(core_bytes)} bytes: it does not fit before the partition")
    boot = Path("/usr/lib/grub/i386-pc/boot.img").read_bytes()
    fd = os.open(tmp, os.O_WRONLY)
    try:
        # boot.img's code and data fields end before the disk signature (440): the partition
        # table sfdisk wrote stays. It loads sector 1 (its default kernel sector): core.img.
        os.pwrite(fd, boot[:440], 0)
        os.pwrite(fd, core_bytes, 512)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, disk)
    part.unlink()
    core.unlink()
    shutil.rmtree(rootfs)


def no_bootloader_disk(path: Path, size: int = 64 * MiB) -> Path:
    """A disk with an MBR partition table and an ext4 file system, but no boot code: what a data disk is."""
    with path.open("wb") as f:
        f.truncate(size)
    subprocess.run(
        [_tool("sfdisk"), "-q", str(path)], input="label: dos\nstart=2048, type=83, bootable\n",
        text=True, check=True, capture_output=True,
    )  # fmt: skip
    part = path.with_suffix(".part")
    _run(_tool("mkfs.ext4"), "-q", "-F", str(part), f"{(size - MiB) // 1024}k")
    _run("dd", f"if={part}", f"of={path}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none")
    part.unlink()
    return path



def store_image(store_root: Path, image_id: str, disks: list[Path], work: Path) -> None:
    """Put disk files into an image store as one image, the way the receiver and Processing do (no server)."""
    from opensmc.agent.pipeline import replicate
    from opensmc.images.store import ImageStore
    from tests.integration.test_images import IndexSender

    store = ImageStore(store_root)
    staged = []
    for i, path in enumerate(disks):
        from opensmc.chunkstore.staging import StagingIndex

        vol = StagingIndex.create(work / f"{image_id}-{i}.fidx", path.stat().st_size, 16384)
        replicate(str(path), IndexSender(vol, store.repo), chunk_size=16384)
        vol.checkpoint(store.repo)
        staged.append(vol.disk())
        vol.close()
    store.create_image(image_id, staged)


if __name__ == "__main__":  # build (or find) the cached guest: `python -m tests.guest`
    print(debian_guest())
    print(legacy_guest())
