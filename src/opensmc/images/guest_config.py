"""Rewrites of a guest's boot configuration for KVM: pure functions over file text, so they are tested alone.

OS adaptation (:mod:`opensmc.images.adaptation`) reads the files from the
guest through libguestfs, rewrites them here and writes them back; each
function returns the new text and a line per change for the adaptation log.

* :func:`fstab_by_uuid`: ``/dev/sda1``-style device names of the system
  disk (``sd``, ``hd``, ``vd``, ``xvd``, the first disk) become
  ``UUID=…``, because the disk is ``/dev/vda`` on virtio; devices of other
  disks, labels and UUIDs are left as they are;
* :func:`kernel_args`: on a GRUB ``linux`` line (or a BLS ``options`` line),
  ``root=/dev/…`` becomes ``root=UUID=…`` and ``console=ttyS0,115200`` is
  added, so that the kernel and a login prompt reach the serial console;
* :func:`default_grub`: the same for ``/etc/default/grub`` before the guest's
  own ``update-grub``/``grub2-mkconfig`` runs, and UUIDs allowed in it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

__all__ = ["SERIAL", "default_grub", "fstab_by_uuid", "grub_cfg", "kernel_args", "system_partition"]

SERIAL = "console=ttyS0,115200"

#: a partition of the system disk under the names a hypervisor or physical machine gives it
_SYSTEM_PART = re.compile(r"^/dev/(?:sd|hd|vd|xvd)a(\d+)$")


def system_partition(device: str) -> int | None:
    """The partition number when ``device`` names a partition of the first disk, else None."""
    found = _SYSTEM_PART.match(device)
    return int(found.group(1)) if found else None


def fstab_by_uuid(text: str, uuid_of: Callable[[int], str | None]) -> tuple[str, list[str]]:
    """fstab with the system disk's partitions by ``UUID=`` (``uuid_of(partition number)``)."""
    out: list[str] = []
    changes: list[str] = []
    for line in text.splitlines(keepends=True):
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            number = system_partition(fields[0])
            uuid = uuid_of(number) if number is not None else None
            if uuid:
                line = line.replace(fields[0], f"UUID={uuid}", 1)
                changes.append(f"/etc/fstab: {fields[0]} ({fields[1] if len(fields) > 1 else '?'}) -> UUID={uuid}")
            elif fields[0].startswith("/dev/") and not fields[0].startswith(("/dev/mapper/", "/dev/disk/")):
                changes.append(f"/etc/fstab: {fields[0]} left as it is (not a partition of the system disk)")
        out.append(line)
    return "".join(out), changes


def kernel_args(args: str, uuid_of: Callable[[int], str | None]) -> tuple[str, list[str]]:
    """A kernel command line with ``root=UUID=…`` and the serial console."""
    changes: list[str] = []
    words = args.split()
    for i, word in enumerate(words):
        if word.startswith("root=/dev/"):
            number = system_partition(word.removeprefix("root="))
            uuid = uuid_of(number) if number is not None else None
            if uuid:
                words[i] = f"root=UUID={uuid}"
                changes.append(f"{word} -> root=UUID={uuid}")
    if not any(w.startswith("console=ttyS0") for w in words):
        words.append(SERIAL)
        changes.append(f"added {SERIAL}")
    return " ".join(words), changes


_LINUX_LINE = re.compile(r"^(\s*(?:linux|linux16|linuxefi)\s+\S+)(.*?)(\s*)$")


def grub_cfg(text: str, uuid_of: Callable[[int], str | None]) -> tuple[str, list[str]]:
    """A grub.cfg (or a BLS entry's ``options`` line) with every kernel's arguments fixed."""
    out: list[str] = []
    changes: list[str] = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        found = _LINUX_LINE.match(body)
        prefix = None
        if found:
            prefix, args = found.group(1), found.group(2)
        elif body.lstrip().startswith("options "):
            indent = body[: len(body) - len(body.lstrip())]
            prefix, args = f"{indent}options", body.lstrip().removeprefix("options")
        if prefix is not None:
            fixed, what = kernel_args(args, uuid_of)
            if what:
                line = f"{prefix} {fixed}" + ("\n" if line.endswith("\n") else "")
                changes.extend(what)
        out.append(line)
    return "".join(out), changes


def _set_var(text: str, name: str, edit: Callable[[str], str]) -> str:
    pattern = re.compile(rf'^{name}=(["\']?)(.*?)\1\s*$', re.M)
    found = pattern.search(text)
    if found is None:
        return text.rstrip("\n") + f'\n{name}="{edit("")}"\n'
    return text[: found.start()] + f'{name}="{edit(found.group(2))}"' + text[found.end() :]


def default_grub(text: str) -> tuple[str, list[str]]:
    """/etc/default/grub with the serial console on the kernel command line and root by UUID allowed."""
    changes: list[str] = []
    cmdline = re.search(r'^GRUB_CMDLINE_LINUX=(["\']?)(.*?)\1\s*$', text, re.M)
    if cmdline is None or "console=ttyS0" not in cmdline.group(2):
        text = _set_var(text, "GRUB_CMDLINE_LINUX", lambda v: f"{v} console=tty0 {SERIAL}".strip())
        changes.append(f"/etc/default/grub: GRUB_CMDLINE_LINUX gets console=tty0 {SERIAL}")
    if re.search(r"^GRUB_DISABLE_LINUX_UUID=[\"']?true", text, re.M):
        text = re.sub(r"^GRUB_DISABLE_LINUX_UUID=.*$", "GRUB_DISABLE_LINUX_UUID=false", text, flags=re.M)
        changes.append("/etc/default/grub: GRUB_DISABLE_LINUX_UUID=false (root by UUID)")
    return text, changes


def uuid_lookup(uuids: Mapping[int, str]) -> Callable[[int], str | None]:
    return lambda number: uuids.get(number)
