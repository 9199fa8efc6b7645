"""File-level replication on the agent: a partition's files, by rsync, into a new filesystem.

A partition the job marks ``Block=false`` comes in the task as one of its
disk's ``files``. For each, before any data moves, :func:`prepare` finds the
directory its filesystem is mounted on (the discovery's mount point, from
``/proc/self/mountinfo``, or ``--mount DEVICE=DIR``; a partition that is not
mounted is refused: the agent does not mount it, since mounting a filesystem
the system does not use can replay its journal), reads its superblock for
the UUID, label, block and inode sizes and features, and checks that its
files fit in the target size with the margin of :data:`MARGIN`. Then
:func:`send` runs rsync (``-aHAXS --numeric-ids -x --delete-excluded``:
owners, modes, ACLs, extended attributes, hard links, sparse files, devices,
FIFOs, symlinks, times; one filesystem; what was deleted or excluded since
the last run goes) through ``agent/tunnel.py`` into the partition's tree on
the receiver, and asks the receiver to build the filesystem
(``receiver/filesystems.py``).

Excludes: :data:`DEFAULT_EXCLUDES`, plus ``--exclude-file`` (SMC's client's
format: one rsync pattern per line, ``#`` comments). Patterns are paths of
the source system: one under another partition's mount point is dropped, one
under this partition's is made relative to it; unanchored patterns apply
everywhere. Python 3.6, standard library only.
"""

import functools
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid as uuid_mod
from typing import Any, Callable, Dict, List, NamedTuple, Optional

from opensmc.agent import tunnel

log = logging.getLogger("opensmc.agent.files")

__all__ = ["DEFAULT_EXCLUDES", "FileLevelError", "FileOptions", "Prepared", "prepare", "remember", "send"]

#: never copied (documented in docs/agent.md): pseudo filesystems' mount points keep their (empty) directory
DEFAULT_EXCLUDES = [
    "/proc/*",
    "/sys/*",
    "/dev/*",
    "/run/*",
    "/tmp/*",
    "/var/tmp/*",
    "/swapfile",
    "/swap.img",
    "/swap",
]
#: a partition's files must fit in its target size with this much to spare: 5 % of the files (their
#: last blocks, directories), 2 % of the filesystem (inode tables, bitmaps), its journal, 4 MiB
MARGIN_FRACTION = 0.05
METADATA_FRACTION = 0.02
MARGIN_BYTES = 4 * 1024 * 1024
#: rsync's exit codes for a connection that broke (socket I/O, protocol stream, timeouts, remote shell)
_LOST_CONTACT_CODES = (10, 12, 30, 35, 255)
_BYTES_PER_MBIT = 1000 * 1000 / 8  # what the block path's limit means too
#: seconds between looks at the run's bandwidth limit while rsync runs (a change applies within 1 s)
_LIMIT_EVERY = 0.2
_PROGRESS = re.compile(r"^\s*([\d,]+)\s+\d+%")
#: the end of a progress2 line: files transferred, and files still to check of those known so far
#: ("ir-chk" while rsync's incremental recursion is still listing, "to-chk" once it knows them all)
_FILES = re.compile(r"xfr#(\d+), (?:ir|to)-chk=(\d+)/(\d+)")
#: rsync --stats lines: what a run reports (files and bytes, besides the progress)
_STATS = {
    "files": re.compile(r"^Number of files: ([\d,]+)"),
    "files_sent": re.compile(r"^Number of regular files transferred: ([\d,]+)"),
    "files_deleted": re.compile(r"^Number of deleted files: ([\d,]+)"),
    "bytes_sent": re.compile(r"^Total transferred file size: ([\d,]+)"),
}


class FileLevelError(Exception):
    """The partition cannot be copied file by file as it is; the message says what to do."""


class FileOptions(NamedTuple):
    mounts: "Dict[str, str]" = {}  # device id -> directory (--mount DEVICE=DIR)
    exclude_file: "Optional[str]" = None
    ca_file: "Optional[str]" = None


class Prepared(NamedTuple):
    part: "Dict[str, Any]"  # the task's entry
    directory: str
    mount_point: str  # where the source system has it (excludes are written in these terms)
    spec: "Dict[str, Any]"  # what the receiver builds (receiver/filesystems.py FsSpec)
    used: int  # bytes the files take (the last run's, until the walk ends, when not checked yet)
    checked: bool = True  # False: the fit is checked while rsync runs (see prepare)


# -- the superblock ---------------------------------------------------------------------------------------

_COMPAT = {
    0x4: "has_journal",
    0x8: "ext_attr",
    0x10: "resize_inode",
    0x20: "dir_index",
    0x200: "sparse_super2",
    0x1000: "orphan_file",
    0x800: "stable_inodes",
}
_INCOMPAT = {
    0x2: "filetype",
    0x10: "meta_bg",
    0x40: "extent",
    0x80: "64bit",
    0x100: "mmp",
    0x200: "flex_bg",
    0x400: "ea_inode",
    0x1000: "dirdata",
    0x2000: "metadata_csum_seed",
    0x4000: "large_dir",
    0x8000: "inline_data",
    0x10000: "encrypt",
    0x20000: "casefold",
}
_RO_COMPAT = {
    0x1: "sparse_super",
    0x2: "large_file",
    0x8: "huge_file",
    0x10: "uninit_bg",
    0x20: "dir_nlink",
    0x40: "extra_isize",
    0x100: "quota",
    0x200: "bigalloc",
    0x400: "metadata_csum",
    0x1000: "readonly",
    0x2000: "project",
    0x8000: "verity",
}


def read_superblock(disk_path: str, offset: int) -> "Dict[str, Any]":
    """UUID, label, sizes and features of the ext2/3/4 filesystem at ``offset`` of the disk."""
    with open(disk_path, "rb") as f:
        f.seek(offset + 1024)
        sb = f.read(1024)
    if len(sb) < 256 or sb[0x38:0x3A] != b"\x53\xef":
        raise FileLevelError(f"no ext2/3/4 superblock at byte {offset} of {disk_path}")

    def le(a: int, b: int) -> int:
        return int.from_bytes(sb[a:b], "little")

    compat, incompat, ro = le(0x5C, 0x60), le(0x60, 0x64), le(0x64, 0x68)
    rev = le(0x4C, 0x50)
    features = [
        n
        for bits, table in ((compat, _COMPAT), (incompat, _INCOMPAT), (ro, _RO_COMPAT))
        for bit, n in sorted(table.items())
        if bits & bit
    ]
    fs_type = "ext4" if incompat & (0x40 | 0x80 | 0x200) or ro & 0x400 else ("ext3" if compat & 0x4 else "ext2")
    label = sb[0x78:0x88].split(b"\0", 1)[0].decode("ascii", "replace")
    return {
        "fs_type": fs_type,
        "uuid": str(uuid_mod.UUID(bytes=bytes(sb[0x68:0x78]))),
        "label": label,
        "block_size": 1024 << le(0x18, 0x1C),
        "inode_size": le(0x58, 0x5A) if rev >= 1 else 128,
        "features": features,
    }


# -- preparing --------------------------------------------------------------------------------------------


def _used_bytes(directory: str) -> int:
    """What the files under ``directory`` take, not crossing into other filesystems.

    A mount point: its filesystem's used blocks (statvfs, instant). A directory (``--mount``):
    ``du -sx`` (a C walk, about 10x faster than this one), else a walk here.
    """
    if os.path.ismount(directory):
        st = os.statvfs(directory)
        return (st.f_blocks - st.f_bfree) * st.f_frsize
    return _du(directory)


def _du(path: str) -> int:
    if shutil.which("du"):
        try:
            out = subprocess.run(
                ["du", "-sx", "-B1", path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=3600
            )
            if out.returncode == 0:
                return int(out.stdout.split()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            pass
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_blocks * 512
    return _walk_used(path)


def _left_out(directory: str, patterns: "List[str]") -> "List[str]":
    """The paths of the tree that its anchored patterns without wildcards leave out, none under another.

    ``/var/cache/``, ``/var/tmp/*``, ``/swapfile``: what rsync will not copy for certain. A pattern
    with a wildcard or without a leading ``/`` may match anywhere, so what it leaves out is not
    known before rsync runs, and it is not taken off (the check stays on the safe side)."""
    found = set()
    for pattern in patterns:
        if not pattern.startswith("/"):
            continue
        body = pattern.rstrip("/")
        if body.endswith("/*"):  # the directory's contents (its own block stays)
            body = body[:-2]
        if not body.strip("/") or any(c in body for c in "*?[\\"):
            continue
        found.add(os.path.normpath(os.path.join(directory, body.lstrip("/"))))
    ordered = sorted(found)
    return [p for p in ordered if not any(p.startswith(q + os.sep) for q in ordered if q != p)]


def _copied_bytes(directory: str, patterns: "List[str]") -> int:
    """What the files rsync copies take: :func:`_used_bytes` less what the patterns surely leave out
    (:func:`_left_out`, on the tree's own filesystem: a pseudo filesystem mounted at ``/proc`` is
    not in the count to begin with)."""
    used = _used_bytes(directory)
    try:
        dev = os.lstat(directory).st_dev
    except OSError:
        return used
    for path in _left_out(directory, patterns):
        try:
            if os.lstat(path).st_dev != dev:
                continue
            used -= _du(path)
        except OSError:
            continue  # not there, or gone since: nothing to take off
    return max(0, used)


def partition_patterns(mount_point: str, options: "FileOptions", all_mounts: "List[str]") -> "List[str]":
    """The exclude patterns of one partition: the defaults, then ``--exclude-file``, in its terms."""
    lines = list(DEFAULT_EXCLUDES)
    if options.exclude_file:
        with open(options.exclude_file, encoding="utf-8", errors="replace") as f:
            lines += f.read().splitlines()
    return exclude_patterns(mount_point, lines, all_mounts)


def _walk_used(directory: str) -> int:
    try:
        root_dev = os.lstat(directory).st_dev
    except OSError as err:
        raise FileLevelError(f"cannot read {directory}: {err.strerror}") from None
    total = 0
    stack = [directory]
    seen = set()  # hard links count once
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != root_dev:
                continue
            if st.st_nlink > 1 and not e.is_dir(follow_symlinks=False):
                if (st.st_ino) in seen:
                    continue
                seen.add(st.st_ino)
            total += st.st_blocks * 512
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
    return total


def journal_bytes(size: int, block: int = 4096) -> int:
    """The journal mke2fs gives a filesystem of ``size`` bytes (ext2fs_default_journal_size, 1.47)."""
    blocks = size // block
    for limit, journal in ((2048, 0), (32768, 1024), (256 * 1024, 4096), (512 * 1024, 8192), (4096 * 1024, 16384),
                           (8192 * 1024, 32768), (16384 * 1024, 65536), (32768 * 1024, 131072)):  # fmt: skip
        if blocks < limit:
            return journal * block
    return 262144 * block


def needed_bytes(used: int, size: int) -> int:
    """What files taking ``used`` bytes need in a new filesystem of ``size`` bytes (docs/agent.md)."""
    return int(used * (1 + MARGIN_FRACTION) + size * METADATA_FRACTION) + journal_bytes(size) + MARGIN_BYTES


def _check_fit(device: str, used: int, size: int) -> None:
    need = needed_bytes(used, size)
    if need > size:
        raise FileLevelError(
            f"partition {device} holds {used} bytes of files; with the filesystem's metadata and journal "
            f"they need {need} bytes, more than its target size of {size} bytes: raise its "
            f"SizeBytes to at least {need + need // 20}, or exclude files"
        )


def _record_path(memory_dir: "Optional[str]", volume_id: str) -> "Optional[str]":
    if memory_dir is None or not volume_id or "/" in volume_id:
        return None
    return os.path.join(memory_dir, volume_id + ".files.json")


def _remembered(memory_dir: "Optional[str]", volume_id: str, directory: str, size: int) -> "Optional[int]":
    """What the last finished run of this partition measured, if it was of the same directory and size."""
    path = _record_path(memory_dir, volume_id)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        if rec.get("directory") == directory and int(rec.get("target_size", -1)) == size:
            return int(rec["used"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def remember(memory_dir: "Optional[str]", prep: "Prepared", used: int) -> None:
    """Note that this partition was sent whole (its later runs check the fit while rsync runs)."""
    path = _record_path(memory_dir, str(prep.part.get("volume_id", "")))
    if path is None:
        return
    rec = {"directory": prep.directory, "target_size": int(prep.spec["size"]), "used": int(used)}
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rec, f)
        os.replace(tmp, path)
    except OSError as e:  # only a later run's speed depends on it
        log.debug("cannot note partition %s in %s: %s", prep.part.get("device"), memory_dir, e)


def prepare(
    disk: "Dict[str, Any]",
    options: "FileOptions",
    memory_dir: "Optional[str]" = None,
    all_mounts: "Optional[List[str]]" = None,
) -> "List[Prepared]":
    """Check every file-level partition of a task's disk; what :func:`send` needs.

    A partition's first run is checked here, before any data moves: mounted, and its files fit
    its target size. A mount point's fit is its filesystem's used blocks (instant); a directory's
    (``--mount``) is a walk of the tree, which on a cold tree of 100,000 files cost an incremental
    run more than its rsync did. So a partition that a run of this agent already sent whole
    (noted in ``memory_dir``, with the same directory and target size) is walked while rsync
    runs, not before: :func:`send` stops rsync and fails the task with the same message if the
    files no longer fit, and the receiver builds nothing from that run. ``all_mounts`` (the
    task's partitions' mount points) gives the excludes their terms, as :func:`send` does.
    """
    out = []
    if disk.get("files") and shutil.which("rsync") is None:
        raise FileLevelError("rsync is not installed on this source: install it to copy partitions file by file")
    for part in disk.get("files") or []:
        device = str(part["device"])
        directory = options.mounts.get(device) or part.get("mount_point")
        if not directory:
            raise FileLevelError(
                "partition {} ({}) is to be copied file by file (Block=false) but is not mounted: mount it "
                "(read-only is enough), or give the agent --mount {}=DIR, or copy it block by block".format(
                    device, part.get("fs_type"), device
                )
            )
        if not os.path.isdir(directory):
            raise FileLevelError(f"partition {device}: {directory} is not a directory")
        spec = read_superblock(disk["path"], int(part["offset"]))
        spec["size"] = int(part["target_size"])
        mount_point = part.get("mount_point") or "/"
        known = (
            None
            if os.path.ismount(directory)
            else _remembered(memory_dir, str(part.get("volume_id", "")), directory, spec["size"])
        )
        if known is not None:
            out.append(Prepared(part, directory, mount_point, spec, known, False))
            continue
        used = _copied_bytes(directory, partition_patterns(mount_point, options, all_mounts or []))
        _check_fit(device, used, spec["size"])
        out.append(Prepared(part, directory, mount_point, spec, used))
    return out


class _FitCheck:
    """The walk of :func:`_copied_bytes` on a thread, for a partition checked while rsync runs."""

    def __init__(self, prep: "Prepared", patterns: "List[str]", on_misfit: "Callable[[], None]") -> None:
        self.prep = prep
        self.patterns = patterns
        self.used = None  # type: Optional[int]
        self.error = None  # type: Optional[FileLevelError]
        self._on_misfit = on_misfit
        self._thread = threading.Thread(target=self._run, name="opensmc-fit-check", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.used = _copied_bytes(self.prep.directory, self.patterns)
            _check_fit(str(self.prep.part["device"]), self.used, int(self.prep.spec["size"]))
        except FileLevelError as e:
            self.error = e
            self._on_misfit()

    def result(self) -> int:
        """The bytes the files take; FileLevelError if they do not fit (waits for the walk)."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.used is not None
        return self.used


def exclude_patterns(mount_point: str, lines: "List[str]", all_mounts: "List[str]") -> "List[str]":
    """The patterns for one partition, relative to its mount point (see the module's docstring)."""
    mp = "/" + mount_point.strip("/")
    deeper = [m for m in all_mounts if m != mp and (mp == "/" or m.startswith(mp + "/"))]
    out = []
    for raw in lines:
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if not line.startswith("/"):
            out.append(line)
            continue
        if mp != "/":
            if not (line == mp or line.startswith(mp + "/")):
                continue
            line = line[len(mp) :] or "/"
        if any(line.startswith(m + "/") for m in deeper):  # another partition's files (-x skips them anyway)
            continue
        out.append(line)
    return out


# -- sending ----------------------------------------------------------------------------------------------


def _package_root() -> str:
    """Where ``opensmc`` is importable from: a directory, or the zipapp itself."""
    import opensmc

    return os.path.dirname(os.path.dirname(os.path.abspath(opensmc.__file__)))


def send(
    prep: "Prepared",
    receiver: str,
    token: str,
    options: "FileOptions",
    *,
    all_mounts: "List[str]",
    limit_mbit: "Callable[[], float]",
    stopped: "threading.Event",
    progress: "Callable[[int], None]",
    build: "Callable[[str, Dict[str, Any]], Dict[str, Any]]",
    memory_dir: "Optional[str]" = None,
    on_files: "Optional[Callable[[int, int], None]]" = None,
) -> "Dict[str, Any]":
    """rsync the partition's files into its tree on the receiver, then have the receiver build its filesystem.

    A partition not checked yet (see :func:`prepare`) is walked while rsync runs; if its files no
    longer fit, rsync is stopped and nothing is built. Once built, the partition is noted in
    ``memory_dir`` so that its next run starts rsync at once. ``limit_mbit`` gives the run's
    bandwidth limit as it is now (Mbit/s, 0 for none): the tunnel holds rsync's stream to it and
    follows a change within a fraction of a second (``agent/tunnel.py`` ``Throttle``). ``on_files``
    hears (files checked, files known) as rsync reports them."""
    patterns = partition_patterns(prep.mount_point, options, all_mounts)
    vid = str(prep.part["volume_id"])
    with tempfile.NamedTemporaryFile("w", prefix="opensmc-excludes-", suffix=".txt", delete=False) as f:
        f.write("".join(p + "\n" for p in patterns))
        excludes = f.name
    rsh = "'{}' -m opensmc.agent.tunnel".format(sys.executable.replace("'", ""))
    cmd = [
        "rsync",
        "-aHAXS",
        "--numeric-ids",
        "-x",
        "--delete-excluded",
        "--partial",
        "--exclude-from=" + excludes,
        "-e",
        rsh,
        "--info=progress2",
        "--stats",
    ]
    cmd += [prep.directory.rstrip("/") + "/", "opensmc:tree"]
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": _package_root(),
            tunnel.ENV_URL: receiver,
            tunnel.ENV_TOKEN: token,
            tunnel.ENV_VOLUME: vid,
        }
    )
    if options.ca_file:
        env[tunnel.ENV_CA] = options.ca_file
    fd, limit_file = tempfile.mkstemp(prefix="opensmc-limit-", suffix=".txt")
    os.close(fd)
    limit = limit_mbit()
    tunnel.write_limit(limit_file, limit * _BYTES_PER_MBIT)
    env[tunnel.ENV_LIMIT] = limit_file
    log.info(
        "partition %s: copying the files of %s (%d bytes) file by file", prep.part["device"], prep.directory, prep.used
    )
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        fit = None if prep.checked else _FitCheck(prep, patterns, functools.partial(_terminate, proc))
        errors = []  # type: List[bytes]
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        watcher = threading.Thread(target=_stop_when, args=(stopped, proc), daemon=True)
        watcher.start()
        buf = b""
        stats: "Dict[str, int]" = {}
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            # rsync makes its output non-blocking: wait for it, and only b"" is its end
            select.select([fd], [], [], _LIMIT_EVERY)
            now = limit_mbit()
            if now != limit:  # the server changed the run's limit: the tunnel reads it again at once
                limit = now
                tunnel.write_limit(limit_file, limit * _BYTES_PER_MBIT)
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue

            if not data:
                break
            buf = (buf + data)[-4096:]
            *lines_, buf = re.split(rb"[\r\n]", buf)
            for raw in lines_:
                line = raw.decode("utf-8", "replace")
                m = _PROGRESS.match(line)
                if m:
                    counts = _FILES.search(line)
                    if counts and on_files is not None:
                        known = int(counts.group(3))
                        on_files(known - int(counts.group(2)), known)
                    progress(min(int(m.group(1).replace(",", "")), prep.used))
                    continue
                for key, pattern in _STATS.items():
                    s = pattern.match(line)
                    if s:
                        stats[key] = int(s.group(1).replace(",", ""))
        code = proc.wait()
        reader.join(5)
    finally:
        os.unlink(excludes)
        for leftover in (limit_file, limit_file + ".tmp"):
            try:
                os.unlink(leftover)
            except OSError:
                pass
    if stopped.is_set():
        return {"stopped": True}
    used = prep.used if fit is None else fit.result()  # FileLevelError if they no longer fit: nothing is built
    if code not in (0, 24):  # 24: files vanished while copying (a live source): the rest is there
        text = b"".join(errors).decode("utf-8", "replace").strip()
        if code in _LOST_CONTACT_CODES and "refused the rsync stream" not in text:
            # the receiver went away (a restart, a network cut): the attempt starts again and
            # rsync's quick check skips every file the tree already holds
            raise ConnectionError(f"the rsync stream of partition {prep.part['device']} broke: {text[-300:]}")
        raise FileLevelError(f"rsync of partition {prep.part['device']} failed (exit {code}): {text[-800:]}")
    if code == 24:
        log.warning(
            "partition %s: some files vanished while they were copied (the source is live)", prep.part["device"]
        )
    progress(prep.used)
    log.info(
        "partition %s: %d of %d files sent (%d bytes)",
        prep.part["device"],
        stats.get("files_sent", 0),
        stats.get("files", 0),
        stats.get("bytes_sent", 0),
    )
    built = dict(build(vid, prep.spec))
    built.update(stats)
    remember(memory_dir, prep, used)
    return built


def _terminate(proc: "subprocess.Popen[bytes]") -> None:
    try:
        proc.send_signal(signal.SIGTERM)
    except OSError:
        pass


def _stop_when(stopped: "threading.Event", proc: "subprocess.Popen[bytes]") -> None:
    while proc.poll() is None:
        if stopped.wait(0.2):
            _terminate(proc)
            return
