"""Source trees for file-level replication tests, and reading an ext4 image's tree back without mounting.

:func:`make_root_tree` builds a tree with every kind of entry a root filesystem
has (owners, modes, setuid, ACLs, xattrs incl. security.capability, hard links,
symlinks, sparse files, device nodes, FIFOs, timestamps, empty dirs) plus paths
the excludes must leave out. :func:`source_entries` and :func:`image_entries`
describe a tree and an ext4 image in the same terms, so tests compare them
entry by entry: the image side through ``debugfs`` (``ls -p``, ``stat``,
``dump``), which reads a filesystem image as it is.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
#: what an ext4 image has that the source tree need not (mke2fs makes it)
IMAGE_ONLY = {"/lost+found"}


def make_root_tree(root: Path, seed: int = 3) -> None:
    import random

    rng = random.Random(seed)
    for d in ("etc", "usr/bin", "var/lib/app", "var/cache/big", "home/user", "proc/1", "tmp", "run", "empty"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/fstab").write_text("UUID=x / ext4 defaults 0 1\n")
    (root / "etc/hostname").write_text("file-level-source\n")
    tool = root / "usr/bin/tool"
    tool.write_bytes(rng.randbytes(200_000))
    os.chmod(tool, 0o4755)  # setuid
    os.setxattr(tool, "security.capability", bytes.fromhex("0100000200200000000000000000000000000000"))
    secret = root / "home/user/secret"
    secret.write_bytes(b"mine\n" * 100)
    os.chown(secret, 1000, 1000)
    os.chmod(secret, 0o600)
    os.chown(root / "home/user", 1000, 1000)
    os.setxattr(secret, "user.comment", b"kept")
    subprocess.run(["setfacl", "-m", "u:1234:r", str(secret)], check=True)
    os.link(tool, root / "usr/bin/tool-hardlink")
    os.symlink("tool", root / "usr/bin/tool-link")
    os.symlink("/etc/hostname", root / "etc/abs-link")
    sparse = root / "var/lib/app/sparse.db"
    with sparse.open("wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(b"data in the middle")
    os.mknod(root / "var/lib/app/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "var/lib/app/blk", 0o660 | stat.S_IFBLK, os.makedev(8, 1))
    os.mkfifo(root / "var/lib/app/fifo", 0o640)
    for i in range(40):
        (root / "var/lib/app" / f"f{i:02d}").write_bytes(rng.randbytes(rng.randint(0, 64 * 1024)))
    (root / "var/cache/big/blob").write_bytes(rng.randbytes(4 * MiB))  # excluded by the test's exclude file
    (root / "proc/1/status").write_text("not a real proc\n")  # excluded by default
    (root / "tmp/scratch").write_text("temporary\n")  # excluded by default
    (root / "swapfile").write_bytes(bytes(MiB))  # excluded by default
    os.utime(root / "etc/fstab", (1_600_000_000, 1_500_000_000))
    os.chmod(root, 0o751)  # mke2fs -d alone would make the root directory 0755 without xattrs
    os.setxattr(root, "user.root-label", b"top")


def excluded(path: str, extra: tuple[str, ...] = ("/var/cache/",)) -> bool:
    """Is ``path`` left out by the defaults and ``extra`` (the test's exclude file: ``/var/cache/*``)?"""
    for prefix in ("/proc/", "/sys/", "/dev/", "/run/", "/tmp/", "/var/tmp/", *extra):
        if path.startswith(prefix):
            return True
    return path in ("/swapfile", "/swap.img", "/swap")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "dir"),
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "chr"),
        (stat.S_ISBLK, "blk"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "sock"),
    ):
        if test(mode):
            return name
    return "?"


def source_entries(root: Path) -> dict[str, dict[str, Any]]:
    """path -> what a copy must keep, for every entry under ``root`` (``/`` is root itself)."""
    out: dict[str, dict[str, Any]] = {}
    inodes: dict[int, str] = {}
    walked = [(root, "/")] + [
        (Path(dirpath) / name, "/" + str((Path(dirpath) / name).relative_to(root)))
        for dirpath, dirnames, filenames in os.walk(root)
        for name in [*dirnames, *filenames]
    ]
    for full, rel in walked:
        st = full.lstat()
        e: dict[str, Any] = {
            "kind": _kind(st.st_mode),
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
        }
        if not stat.S_ISDIR(st.st_mode):
            e["mtime"] = int(st.st_mtime)
        if stat.S_ISREG(st.st_mode):
            e["size"] = st.st_size
            e["sha"] = hashlib.sha256(full.read_bytes()).hexdigest()
            if st.st_nlink > 1:
                e["link"] = inodes.setdefault(st.st_ino, rel)
        if stat.S_ISLNK(st.st_mode):
            e["target"] = os.readlink(full)
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            e["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if not stat.S_ISLNK(st.st_mode):
            names = sorted(os.listxattr(full, follow_symlinks=False))
            e["xattrs"] = {n: (None if n.startswith("system.posix_acl") else os.getxattr(full, n).hex()) for n in names}
        out[rel] = e
    return out


def _debugfs(image: Path, commands: list[str]) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".cmds", delete=False) as f:
        f.write("\n".join(commands) + "\n")
        name = f.name
    try:
        done = subprocess.run(["debugfs", "-f", name, str(image)], capture_output=True, text=True, check=True)
    finally:
        os.unlink(name)
    return done.stdout


def image_entries(image: Path) -> dict[str, dict[str, Any]]:
    """The same description of the ext4 filesystem image ``image`` (read with debugfs, nothing mounted)."""
    paths: list[tuple[str, int]] = [("/", 2)]  # (path, inode)
    todo = ["/"]
    while todo:
        d = todo.pop()
        listing = _debugfs(image, [f'ls -p "{d}"'])
        for line in listing.splitlines():
            parts = line.strip()[1:].split("/")  # /inode/mode/uid/gid/name/size/
            if len(parts) < 6:
                continue
            ino, mode_s, name = int(parts[0]), parts[1], parts[4]
            if name in (".", "..") or ino == 0:
                continue
            path = (d.rstrip("/") + "/" + name) if d != "/" else "/" + name
            paths.append((path, ino))
            if stat.S_ISDIR(int(mode_s, 8)):
                todo.append(path)
    stats = _debugfs(image, [f'stat "{p}"' for p, _ in paths]).split("Inode: ")[1:]
    out: dict[str, dict[str, Any]] = {}
    first_of: dict[int, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for (path, ino), text in zip(paths, stats, strict=True):
            mode = int(re.search(r"Mode:\s+(\d+)", text).group(1), 8)  # type: ignore[union-attr]
            ftype = re.search(r"Type: (\S+)", text).group(1)  # type: ignore[union-attr]
            kind = {
                "directory": "dir",
                "regular": "file",
                "symlink": "symlink",
                "character": "chr",
                "block": "blk",
                "FIFO": "fifo",
                "socket": "sock",
            }.get(ftype, "?")
            user = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", text)
            assert user is not None
            e: dict[str, Any] = {"kind": kind, "mode": mode, "uid": int(user.group(1)), "gid": int(user.group(2))}
            if kind != "dir":
                e["mtime"] = int(re.search(r"mtime: 0x([0-9a-f]+)", text).group(1), 16)  # type: ignore[union-attr]
            if kind == "file":
                dump = Path(tmp) / str(ino)
                if not dump.exists():
                    _debugfs(image, [f'dump "{path}" {dump}'])
                e["size"] = int(re.search(r"Size: (\d+)", text).group(1))  # type: ignore[union-attr]
                e["sha"] = hashlib.sha256(dump.read_bytes()).hexdigest()
                e["blocks"] = int(re.search(r"Blockcount: (\d+)", text).group(1))  # type: ignore[union-attr]
                links = int(re.search(r"Links: (\d+)", text).group(1))  # type: ignore[union-attr]
                if links > 1:
                    e["link"] = first_of.setdefault(ino, path)
            if kind == "symlink":
                m = re.search(r'Fast link dest: "(.*)"', text)
                e["target"] = m.group(1) if m else _debugfs(image, [f'cat "{path}"'])
            if kind in ("chr", "blk"):
                m = re.search(r"Device major/minor number: (\d+):(\d+)", text)
                assert m is not None, text
                e["rdev"] = (int(m.group(1)), int(m.group(2)))
            if kind != "symlink":
                xattrs: dict[str, Any] = {}
                block = text.split("Extended attributes:", 1)
                if len(block) == 2:
                    for line in block[1].splitlines()[1:]:
                        m = re.match(r"\s+(\S+) \((\d+)\)(?: = (.*))?$", line)
                        if not m:
                            break
                        xattrs[m.group(1)] = None if m.group(1).startswith("system.posix_acl") else m.group(3)
                e["xattrs"] = xattrs
            out[path] = e
    # debugfs prints values as text or hex: compare those by reading them raw
    for path, e in out.items():
        for name, shown in list(e.get("xattrs", {}).items()):
            if shown is not None:
                e["xattrs"][name] = _xattr_hex(image, path, name)
    return out


def _xattr_hex(image: Path, path: str, name: str) -> str:
    with tempfile.NamedTemporaryFile(delete=False) as f:
        out = f.name
    try:
        _debugfs(image, [f'ea_get -f {out} "{path}" {name}'])
        return Path(out).read_bytes().hex()
    finally:
        os.unlink(out)


def compare(
    src: dict[str, dict[str, Any]], img: dict[str, dict[str, Any]], extra: tuple[str, ...] = ("/var/cache/",)
) -> list[str]:
    """Differences, as readable lines (empty: the image holds exactly the source minus the excludes)."""
    problems: list[str] = []
    want = {p: e for p, e in src.items() if not excluded(p, extra)}
    for path in sorted(set(want) | set(img)):
        if path in IMAGE_ONLY and path not in want:
            continue
        a, b = want.get(path), img.get(path)
        if a is None:
            problems.append(f"{path}: in the image, not in the source (or excluded)")
            continue
        if b is None:
            problems.append(f"{path}: missing from the image")
            continue
        for key in ("kind", "mode", "uid", "gid", "mtime", "size", "sha", "target", "rdev", "xattrs"):
            if key in a and a.get(key) != b.get(key):
                problems.append(f"{path}: {key} {a.get(key)!r} != {b.get(key)!r}")
        if "link" in a:
            ga = sorted(p for p, e in want.items() if e.get("link") == a["link"])
            gb = sorted(p for p, e in img.items() if e.get("link") == b.get("link"))
            if ga != gb:
                problems.append(f"{path}: hard links {ga} != {gb}")
    return problems
