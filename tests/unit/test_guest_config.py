"""OS adaptation's rewrites of a guest's fstab, GRUB configuration and kernel command line."""

from __future__ import annotations

from opensmc.images.guest_config import (
    SERIAL,
    default_grub,
    fstab_by_uuid,
    grub_cfg,
    kernel_args,
    system_partition,
    uuid_lookup,
)

UUIDS = uuid_lookup({1: "aaaa-1111", 2: "bbbb-2222"})


def test_system_partitions_are_those_of_the_first_disk_under_any_bus_name() -> None:
    assert [system_partition(d) for d in ("/dev/sda1", "/dev/hda2", "/dev/vda1", "/dev/xvda3")] == [1, 2, 1, 3]
    assert [system_partition(d) for d in ("/dev/sdb1", "/dev/sda", "/dev/mapper/vg-root", "UUID=x")] == [None] * 4


def test_fstab_names_the_system_disk_by_uuid_and_leaves_the_rest() -> None:
    text = (
        "# /etc/fstab\n"
        "/dev/sda1  /      ext4 errors=remount-ro 0 1\n"
        "/dev/hda2  /boot  ext2 defaults 0 2\n"
        "/dev/sdb1  /data  xfs  defaults 0 0\n"
        "UUID=cccc  /srv   ext4 defaults 0 0\n"
        "/dev/mapper/vg-swap none swap sw 0 0\n"
        "proc /proc proc defaults 0 0\n"
    )
    out, changes = fstab_by_uuid(text, UUIDS)
    lines = out.splitlines()
    assert lines[1] == "UUID=aaaa-1111  /      ext4 errors=remount-ro 0 1"
    assert lines[2] == "UUID=bbbb-2222  /boot  ext2 defaults 0 2"
    assert lines[3:] == text.splitlines()[3:]  # other disks, UUIDs, LVM and proc as they were
    assert changes[0] == "/etc/fstab: /dev/sda1 (/) -> UUID=aaaa-1111"
    assert "/etc/fstab: /dev/sdb1 left as it is (not a partition of the system disk)" in changes
    assert fstab_by_uuid(out, UUIDS) == (out, [c for c in changes if "left as it is" in c])  # idempotent


def test_a_partition_without_a_uuid_stays_a_device_name() -> None:
    out, changes = fstab_by_uuid("/dev/sda3 / ext4 defaults 0 1\n", UUIDS)
    assert out == "/dev/sda3 / ext4 defaults 0 1\n" and "left as it is" in changes[0]


def test_kernel_arguments_get_root_by_uuid_and_the_serial_console() -> None:
    args, changes = kernel_args(" root=/dev/sda1 ro quiet", UUIDS)
    assert args == f"root=UUID=aaaa-1111 ro quiet {SERIAL}"
    assert changes == ["root=/dev/sda1 -> root=UUID=aaaa-1111", f"added {SERIAL}"]
    assert kernel_args(args, UUIDS) == (args, [])
    lvm = "root=/dev/mapper/vg-root console=ttyS0"
    assert kernel_args(lvm, UUIDS) == (lvm, [])


def test_grub_cfg_and_bls_entries_are_fixed_on_their_kernel_lines_only() -> None:
    cfg = (
        "set root='hd0,msdos1'\n"
        "menuentry 'Debian' {\n"
        "  linux /boot/vmlinuz-6.1 root=/dev/sda1 ro quiet\n"
        "  initrd /boot/initrd.img-6.1\n"
        "}\n"
        "\tlinux16 /vmlinuz root=UUID=aaaa-1111 console=ttyS0,115200\n"
    )
    out, changes = grub_cfg(cfg, UUIDS)
    assert out.splitlines()[2] == f"  linux /boot/vmlinuz-6.1 root=UUID=aaaa-1111 ro quiet {SERIAL}"
    assert out.splitlines()[5] == cfg.splitlines()[5]
    assert [line for i, line in enumerate(out.splitlines()) if i != 2] == [
        line for i, line in enumerate(cfg.splitlines()) if i != 2
    ]
    assert len(changes) == 2
    bls, what = grub_cfg("title RHEL\noptions root=/dev/vda2 ro rhgb\n", UUIDS)
    assert bls == f"title RHEL\noptions root=UUID=bbbb-2222 ro rhgb {SERIAL}\n" and len(what) == 2


def test_default_grub_gets_the_serial_console_and_uuids_allowed() -> None:
    text = 'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX="net.ifnames=0"\nGRUB_DISABLE_LINUX_UUID=true\n'
    out, changes = default_grub(text)
    assert f'GRUB_CMDLINE_LINUX="net.ifnames=0 console=tty0 {SERIAL}"' in out
    assert "GRUB_DISABLE_LINUX_UUID=false" in out and "GRUB_DEFAULT=0" in out
    assert len(changes) == 2
    assert default_grub(out) == (out, [])
    added, _ = default_grub("GRUB_TIMEOUT=5\n")
    assert added == f'GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX="console=tty0 {SERIAL}"\n'
