"""The boot test's reading of a console: which line means which stage and verdict; NBD listen addresses."""

from __future__ import annotations

from pathlib import Path

import pytest

from opensmc.images.boot import _Console, match_line
from opensmc.images.nbd import Listen


@pytest.mark.parametrize(
    ("line", "stage", "outcome"),
    [
        ("SeaBIOS (version 1.16.2-debian-1.16.2-1)", "firmware", None),
        ("No bootable device.  Retrying in 60 seconds.", "firmware", "fail"),
        ("Welcome to GRUB!", "bootloader", None),
        ("grub rescue> ", "bootloader", "fail"),
        ("grub> ", "bootloader", "fail"),
        ("[    0.000000] Linux version 6.1.0-50-amd64 (debian-kernel@lists.debian.org)", "kernel", None),
        ("[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)", "kernel", "fail"),
        ("(initramfs) ", "initramfs", "fail"),
        ("ALERT!  /dev/sda1 does not exist.  Dropping to a shell!", "initramfs", "fail"),
        ("dracut-initqueue[312]: Warning: dracut-initqueue: timeout, still waiting for hooks:", "initramfs", "fail"),
        ("You are in emergency mode. After logging in, type \"journalctl -xb\" to view", "userspace", "fail"),
        ("[  OK  ] Reached target multi-user.target - Multi-User System.", "login", "pass"),
        ("opensmc-guest login: ", "login", "pass"),
    ],
)
def test_lines_map_to_stages_and_verdicts(line: str, stage: str, outcome: str | None) -> None:
    found = match_line(line)
    assert found is not None and found[:2] == (stage, outcome), found


def test_ordinary_lines_decide_nothing() -> None:
    assert match_line("Last login: Tue Dec  1 10:00:00 UTC 2026 on ttyS0") is None
    assert match_line("random kernel chatter") is None


def test_console_strips_escapes_split_across_reads(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    console = _Console(log)
    log.write_bytes(b"\x1b[2J\x1b[0mSeaBIOS (version 1)\r\nGRUB \x1b")
    done, partial = console.poll()
    assert done == ["SeaBIOS (version 1)"]
    with log.open("ab") as f:
        f.write(b"[mloading.\nhost login: ")
    done, partial = console.poll()
    assert done == ["GRUB loading."] and partial == "host login:"
    assert console.tail() == ["SeaBIOS (version 1)", "GRUB loading.", "host login:"]


@pytest.mark.parametrize(
    ("text", "uri"),
    [
        ("127.0.0.1:10810", "nbd://127.0.0.1:10810/"),
        (":10811", "nbd://127.0.0.1:10811/"),
        ("0.0.0.0", "nbd://0.0.0.0:10809/"),
        ("unix:/run/x.sock", "nbd+unix:///?socket=/run/x.sock"),
        ("/run/y.sock", "nbd+unix:///?socket=/run/y.sock"),
        ("[::1]:10809", "nbd://[::1]:10809/"),
    ],
)
def test_listen_addresses(text: str, uri: str) -> None:
    assert Listen.parse(text).uri() == uri


def test_a_bad_port_says_so() -> None:
    with pytest.raises(ValueError, match="port must be a number"):
        Listen.parse("localhost:http")
