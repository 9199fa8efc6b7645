"""receiver/patch.py without I/O: rsync's change log, debugfs's listings and undo file read back."""

from __future__ import annotations

import struct

import pytest

from opensmc.receiver.patch import CannotPatch, Item, changed_ranges, parse_log, parse_ls, xattr_names

LOG = b"""2026/12/01 19:25:29 [24922] receiving file list
2026/12/01 19:25:29 [24922] OSMC cS+++++++++ p
2026/12/01 19:25:29 [24922] OSMC .f........x a/f
2026/12/01 19:25:29 [24922] OSMC cL+++++++++ a/l -> f
2026/12/01 19:25:29 [24922] OSMC cd+++++++++ srv/
2026/12/01 19:25:29 [24922] OSMC >f+++++++++ srv/new leader
2026/12/01 19:25:29 [24922] OSMC hf+++++++++ srv/follower => srv/new leader
2026/12/01 19:25:29 [24922] OSMC *deleting   old/
2026/12/01 19:25:29 [24922] sent 88 bytes  received 341 bytes  total size 7
"""


def test_the_change_log_is_read_item_by_item_in_order() -> None:
    assert parse_log(LOG) == [
        Item("cS+++++++++", "p"),
        Item(".f........x", "a/f"),
        Item("cL+++++++++", "a/l"),
        Item("cd+++++++++", "srv/"),
        Item(">f+++++++++", "srv/new leader"),
        Item("hf+++++++++", "srv/follower", "srv/new leader"),
        Item("*deleting", "old/"),
    ]


@pytest.mark.parametrize(
    "line",
    [
        b"a name with a newline in it, continued\n",  # rsync writes names raw: a line without its prefix
        b"2026/12/01 19:25:29 [1] OSMC hf+++++++++ a => b => c\n",  # which is the name?
        b"2026/12/01 19:25:29 [1] OSMC cL+++++++++ a -> b -> c\n",
        b"2026/12/01 19:25:29 [1] OSMC >f\n",
    ],
)
def test_a_change_log_line_it_cannot_tell_apart_is_refused(line: bytes) -> None:
    with pytest.raises(CannotPatch):
        parse_log(LOG + line)


def test_debugfs_listings_are_read() -> None:
    ls = (
        " /2/40755/0/0/./4096/\n /2/40755/0/0/../4096/\n /12/100644/0/0/a b/5/\n"
        " /13/40700/0/0/d/4096/\n /0/0/0/0/gone//\n"
    )
    assert parse_ls(ls) == {"a b": False, "d": True}
    ea = 'Extended attributes:\n  user.comment (4) = "kept"\n  system.data (0)\n  system.posix_acl_access (28)\n'
    assert xattr_names(ea) == ["user.comment", "system.posix_acl_access"]


def _undo(keys: list[tuple[int, int]], block: int = 1024, fs_block: int = 4096) -> bytes:
    """An undo file as e2fsprogs' undo_io writes one: header, then key blocks each followed by their data."""
    per = block // 16 - 1
    out = bytearray(struct.pack("<8sQQQII", b"E2UNDO02", len(keys), 1, 2, block, fs_block).ljust(2 * block, b"\0"))
    for i in range(0, len(keys), per):
        group = keys[i : i + per]
        kb = struct.pack("<IIQ", 0xCADECADE, 0, 0) + b"".join(struct.pack("<QII", b, 0, n) for b, n in group)
        out += kb.ljust(block, b"\0")
        for _b, n in group:
            out += bytes(-(-n // block) * block)
    return bytes(out)


def test_the_undo_file_says_which_ranges_debugfs_wrote() -> None:
    keys = [(0, 4096), (7, 8192)] + [(100 + i, 4096) for i in range(70)]  # more keys than one key block holds
    assert changed_ranges(_undo(keys)) == [(b * 4096, n) for b, n in keys]
    with pytest.raises(CannotPatch):
        changed_ranges(b"not an undo file" * 100)
    with pytest.raises(CannotPatch):
        changed_ranges(_undo(keys)[: 3 * 1024])  # a key block missing
