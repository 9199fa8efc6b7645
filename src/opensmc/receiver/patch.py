"""An incremental file-level build: the last run's filesystem image, patched with what rsync changed.

A full build (``receiver/filesystems.py``) costs the partition: ``mke2fs -d``
reads the whole tree and the store reads the whole image. After a later
run's rsync has changed a few files, this module makes the same filesystem
for the cost of the change instead:

1. The receiver's ``rsync --server`` itemizes what it does into
   ``<volume>.changes`` (``--log-file``, one ``OSMC %i %n%L`` line per entry
   it created, updated, re-linked or deleted; ``receiver/rsync.py``).
2. :func:`plan` turns those lines into a ``debugfs`` command file that applies
   them to the image the last build left (``<volume>.img``): ``rm``/``rmdir``
   of deleted entries, ``write`` (the same code as ``mke2fs -d``'s: holes
   stay holes), ``mkdir``, ``symlink``, ``mknod``, ``ln``, then
   ``set_inode_field`` for mode, owner and times and ``ea_set`` for extended
   attributes and ACLs, every value read from the tree as it is now.
3. ``debugfs -w -z UNDO -f CMDS`` runs it; its undo file lists every block it
   wrote (:func:`changed_ranges`), so only the chunks holding those blocks are
   read and put into the store: not the tree, not the rest of the image.

Whatever the plan cannot do exactly (a socket, a name debugfs's command
parser cannot quote, a hard-link group it cannot see whole, a line it does
not understand, an error from debugfs) raises :class:`CannotPatch`, and the
caller rebuilds the whole filesystem instead, saying why in its log: a patch
is never a guess.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CannotPatch", "Plan", "changed_ranges", "parse_log", "plan"]

#: the prefix rsync puts before every --log-file line, then ours
_LINE = re.compile(rb"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[\d+\] (.*)$")
LOG_FORMAT = "OSMC %i %n%L"
_MARK = b"OSMC "
#: what debugfs's command parser cannot take inside double quotes
_UNQUOTABLE = re.compile(r'["\\\x00-\x1f\x7f]')


#: directories of the last image -> {name: is a directory} of their entries (none for a directory it lacks)
Listing = Callable[[list[str]], dict[str, dict[str, bool]]]


class CannotPatch(Exception):
    """The change cannot be applied exactly: rebuild the filesystem (the message says why)."""


@dataclass(frozen=True)
class Item:
    flags: str  # rsync's %i: YXcstpoguax, or "*deleting"
    name: str  # relative to the tree; directories end with "/"
    link: str = ""  # a hard link's target ("=> target"), relative to the tree


def parse_log(raw: bytes) -> list[Item]:
    """The itemized changes of an rsync --log-file written with :data:`LOG_FORMAT`, in order."""
    items: list[Item] = []
    for line in raw.split(b"\n"):
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            raise CannotPatch(f"rsync's change log has a line it cannot read: {line[:120]!r}")
        rest = m.group(1)
        if not rest.startswith(_MARK):
            continue  # rsync's own lines: "receiving file list", totals
        body = rest[len(_MARK) :].decode("utf-8", "surrogateescape")
        flags, sep, name = body[:11].rstrip(), body[11:12], body[12:]
        if sep != " " or not name or len(flags) < 2:
            raise CannotPatch(f"rsync's change log has an item it cannot read: {body[:120]!r}")
        link = ""
        if flags[0] == "h":
            parts = name.split(" => ")
            if len(parts) != 2:
                raise CannotPatch(f"a hard link whose name cannot be told from its target: {name!r}")
            name, link = parts
        elif flags[1] == "L" and flags[0] != "*":
            parts = name.split(" -> ")
            if len(parts) != 2:
                raise CannotPatch(f"a symlink whose name cannot be told from its target: {name!r}")
            name = parts[0]
        items.append(Item(flags, name, link))
    return items


@dataclass
class Plan:
    """A debugfs command file, the files it reads values from, and what it will write."""

    commands: list[str] = field(default_factory=list)
    values: dict[str, bytes] = field(default_factory=dict)  # value file name -> bytes (xattrs)
    #: paths whose extended attributes are replaced: their old names are removed first (see :func:`plan`)
    replace_xattrs: list[str] = field(default_factory=list)
    data_bytes: int = 0  # bytes of file content written
    items: int = 0


def _image_path(name: str) -> str:
    rel = name.rstrip("/")
    p = "/" if rel in ("", ".") else "/" + rel.removeprefix("./")
    if _UNQUOTABLE.search(p):
        raise CannotPatch(f"{p!r}: a name debugfs's commands cannot quote")
    return p


def _q(s: str) -> str:
    if _UNQUOTABLE.search(s):
        raise CannotPatch(f"{s!r}: a name debugfs's commands cannot quote")
    return f'"{s}"'


def plan(items: list[Item], tree: Path, values_dir: Path, listing: Listing) -> Plan:
    """The debugfs commands that make the last image hold ``tree`` as it is now, given what changed.

    ``listing`` gives the entries the last image has in the directories new entries go into: rsync
    replaces an entry of another type (a FIFO by a file) without itemizing its deletion."""
    out = Plan()
    new_in = sorted({_image_path(it.name).rsplit("/", 1)[0] or "/" for it in items if _is_new(it.flags)})
    present = {
        d + "/" + n if d != "/" else "/" + n: is_dir
        for d, names in listing(new_in).items()
        for n, is_dir in names.items()
    }

    def remove_old(p: str) -> None:
        """The entry at ``p`` the image has (or this change made), before one is made there."""
        if p in present:
            if present[p]:
                raise CannotPatch(f"{p}: a directory replaced by another kind of entry")
            out.commands.append(f"rm {_q(p)}")

    linked: dict[str, int] = {}  # hard-link target -> names linked to it in this change
    for it in items:
        if it.flags[0] == "h":
            linked[_image_path(it.link)] = linked.get(_image_path(it.link), 0) + 1
    for it in items:
        out.items += 1
        y, x, attrs = it.flags[0], it.flags[1], it.flags[2:]
        p = _image_path(it.name)
        if y == "*":
            if it.flags != "*deleting":
                raise CannotPatch(f"an rsync message it does not know: {it.flags} {it.name}")
            if p == "/":
                raise CannotPatch("the root directory was deleted")
            out.commands.append(f"{'rmdir' if it.name.endswith('/') else 'rm'} {_q(p)}")
            present.pop(p, None)
            continue
        new = _is_new(it.flags)
        local = _inside(tree, p)
        try:
            st = os.lstat(local)
        except FileNotFoundError:
            raise CannotPatch(f"{p}: changed by rsync, then gone from the tree (a later run removed it?)") from None
        parent, base = p.rsplit("/", 1)
        parent = parent or "/"
        if p != "/" and (base.startswith("-") or not base):
            raise CannotPatch(f"{p!r}: a name debugfs's commands would take for an option")
        if y == "h":
            if x != "f" or not stat.S_ISREG(st.st_mode):
                raise CannotPatch(f"{p}: a hard link to something other than a regular file")
            remove_old(p) if new else out.commands.append(f"rm {_q(p)}")
            present[p] = False
            target = _image_path(it.link)
            out.commands.append(f"ln {_q(target)} {_q(p)}")
            out.commands.append(f"sif {_q(target)} links_count {st.st_nlink}")
            continue
        xattrs = "none"
        if y == ".":
            if (x == "d" and not stat.S_ISDIR(st.st_mode)) or (x == "f" and not stat.S_ISREG(st.st_mode)):
                raise CannotPatch(f"{p}: rsync's item and the tree disagree on its type")
            if "x" in attrs or "a" in attrs:
                xattrs = "replace"
        elif y == ">" and x == "f":
            if not stat.S_ISREG(st.st_mode):
                raise CannotPatch(f"{p}: received as a file, not a file in the tree")
            if st.st_nlink > 1 and linked.get(p, 0) < st.st_nlink - 1:
                raise CannotPatch(f"{p}: rewritten, with hard links this change does not name")
            remove_old(p) if new else out.commands.append(f"rm {_q(p)}")
            present[p] = False
            out.commands.append(f"cd {_q(parent)}")
            out.commands.append(f"write {_q(str(local))} {_q(base)}")
            out.data_bytes += st.st_blocks * 512  # what it holds: holes stay holes
            xattrs = "all"
        elif y == "c" and x == "d":
            if not stat.S_ISDIR(st.st_mode):
                raise CannotPatch(f"{p}: created as a directory, not one in the tree")
            if new:
                remove_old(p)
                present[p] = True
                out.commands.append(f"cd {_q(parent)}")  # debugfs looks "/x"'s parent up as ""
                out.commands.append(f"mkdir {_q(base)}")
                xattrs = "all"
            elif "x" in attrs or "a" in attrs:
                xattrs = "replace"
        elif y == "c" and x == "L":
            if not stat.S_ISLNK(st.st_mode):
                raise CannotPatch(f"{p}: created as a symlink, not one in the tree")
            if os.listxattr(local, follow_symlinks=False):
                raise CannotPatch(f"{p}: a symlink with extended attributes")
            remove_old(p) if new else out.commands.append(f"rm {_q(p)}")
            present[p] = False
            out.commands.append(f"cd {_q(parent)}")
            out.commands.append(f"symlink {_q(base)} {_q(os.readlink(local))}")
        elif y == "c" and x in "DS":
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
                node = f"{kind} {os.major(st.st_rdev)} {os.minor(st.st_rdev)}"
            elif stat.S_ISFIFO(st.st_mode):
                node = "p"
            else:
                raise CannotPatch(f"{p}: a socket (debugfs makes none)")
            remove_old(p) if new else out.commands.append(f"rm {_q(p)}")
            present[p] = False
            out.commands.append(f"cd {_q(parent)}")
            out.commands.append(f"mknod {_q(base)} {node}")
            xattrs = "all"
        else:
            raise CannotPatch(f"an rsync item it does not apply: {it.flags} {it.name}")
        _attrs(out, p, local, st, xattrs, values_dir)
    return out


def _is_new(flags: str) -> bool:
    """rsync made the entry (its attributes all "+"), as opposed to updating one that was there."""
    return flags[0] != "*" and len(flags) > 2 and set(flags[2:]) == {"+"}


def _inside(tree: Path, p: str) -> Path:
    """The tree's entry at image path ``p``, refused when a directory on the way is not a directory of the
    tree (a symlink that a later run put where a directory was): debugfs would read the receiver's files."""
    root = os.path.realpath(tree)
    if p == "/":
        return Path(root)
    parts = p.strip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise CannotPatch(f"{p!r}: not a plain path inside the tree")
    parent = os.path.join(root, *parts[:-1])
    if os.path.realpath(parent) != os.path.normpath(parent):
        raise CannotPatch(f"{p}: a directory on its way is a symlink in the tree now")
    return Path(parent) / parts[-1]


def _attrs(out: Plan, p: str, local: Path, st: os.stat_result, xattrs: str, values_dir: Path) -> None:
    """Mode, owner, times as ``mke2fs -d`` sets them (seconds), and the extended attributes."""
    qp = _q(p)
    out.commands += [
        f"sif {qp} mode 0{st.st_mode:o}",
        f"sif {qp} uid {st.st_uid}",
        f"sif {qp} gid {st.st_gid}",
        f"sif {qp} atime @{int(st.st_atime)}",
        f"sif {qp} mtime @{int(st.st_mtime)}",
        f"sif {qp} ctime @{int(st.st_ctime)}",
    ]
    if xattrs == "none" or stat.S_ISLNK(st.st_mode):
        return
    if xattrs == "replace":
        out.replace_xattrs.append(p)
        out.commands.append(f"#XATTRS-OF {p}")  # replaced by ea_rm of the image's current names
    for name in os.listxattr(local, follow_symlinks=False):
        if _UNQUOTABLE.search(name) or " " in name:
            raise CannotPatch(f"{p}: an extended attribute name debugfs cannot take: {name!r}")
        value = values_dir / str(len(out.values))
        out.values[value.name] = os.getxattr(local, name, follow_symlinks=False)
        out.commands.append(f"ea_set -f {_q(str(value))} {qp} {name}")


_EA_NAME = re.compile(r"^\s+(\S+) \(\d+\)")


def xattr_names(listing: str) -> list[str]:
    """The attribute names in debugfs's ``ea_list`` output for one entry, but ``system.data``: that is
    ext4's own (an inline_data file's or directory's content), not one of the tree's attributes."""
    names = [m.group(1) for line in listing.splitlines() if (m := _EA_NAME.match(line))]
    return [n for n in names if n != "system.data"]


_LS_P = re.compile(r"^/(\d+)/(\d+)/\d*/\d*/(.*)/[^/]*/$")


def parse_ls(text: str) -> dict[str, bool]:
    """{name: is a directory} from debugfs's ``ls -p`` of one directory (``/ino/mode/uid/gid/name/size/``)."""
    out: dict[str, bool] = {}
    for line in text.splitlines():
        m = _LS_P.match(line.strip())
        if m and m.group(3) not in (".", "..") and m.group(1) != "0":
            out[m.group(3)] = stat.S_ISDIR(int(m.group(2), 8))
    return out


_UNDO_HEADER = struct.Struct("<8sQQQII")
_KEY = struct.Struct("<QII")
_KEYBLOCK_MAGIC = 0xCADECADE


def changed_ranges(undo: bytes) -> list[tuple[int, int]]:
    """(offset, length) of every range of the image debugfs wrote, from its undo file (``-z``).

    The undo file holds the old content of each block before its first write,
    keyed by block; e2fsprogs' ``e2undo`` reads it the same way."""
    if len(undo) < _UNDO_HEADER.size:
        raise CannotPatch("debugfs's undo file is too short")
    magic, num_keys, _super, key_offset, block_size, fs_block_size = _UNDO_HEADER.unpack_from(undo)
    if magic != b"E2UNDO02" or not block_size or not fs_block_size:
        raise CannotPatch("debugfs's undo file is not one this receiver reads")
    per_block = block_size // _KEY.size - 1
    out: list[tuple[int, int]] = []
    blk = key_offset
    done = 0
    while done < num_keys:
        kb = undo[blk * block_size : (blk + 1) * block_size]
        if len(kb) < block_size or struct.unpack_from("<I", kb)[0] != _KEYBLOCK_MAGIC:
            raise CannotPatch("debugfs's undo file has a damaged key block")
        blk += 1
        for j in range(min(per_block, num_keys - done)):
            fsblk, _crc, size = _KEY.unpack_from(kb, 16 + j * _KEY.size)
            out.append((fsblk * fs_block_size, size))
            blk += -(-size // block_size)
        done += per_block
    return out
