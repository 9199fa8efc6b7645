"""A partition copied file by file becomes a new filesystem, then chunks in the store.

After the agent's rsync has brought a partition's tree up to date
(``receiver/rsync.py``), ``POST /v1/volumes/<partition volume>/build`` makes
its filesystem. The first time (and whenever the last image cannot be
trusted or patched exactly), whole: ``mke2fs -d`` populates a new ext2/3/4
filesystem from the tree without mounting anything, of the target size, with
the source's UUID, label, block and inode sizes and features (so fstab, the
bootloader and the kernel find what they found before). The image file is
then read once, hole by hole skipped, into a staging index of its own
(``<volume>.fidx``, beside its disk's), whose chunks go into the store like
any received chunk: blobs the store has already are not stored again. The
new index replaces the old one in one rename, so a crash leaves the last
complete build; sealing composes the image disk from it
(``service/file_images.py``).

The image is kept (``<volume>.img``, copied from tmpfs by a thread after the
build has answered), and a later build patches it with what rsync changed
(``receiver/patch.py``): debugfs applies the change, its undo file says
which blocks it wrote, and only those chunks are read into the store. So a
first build costs the partition's data (mke2fs writes it once, the store
reads it once) and a later one what changed. :class:`Kept` says when the
kept image is not to be trusted (then the whole filesystem is built again,
and the receiver's log says why).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid as uuid_mod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from opensmc.chunkstore.backend import fsync_dir
from opensmc.chunkstore.repository import Repository
from opensmc.chunkstore.staging import StagingIndex
from opensmc.faults import crash_point
from opensmc.receiver import patch
from opensmc.receiver.patch import CannotPatch
from opensmc.receiver.rsync import CHANGES_SUFFIX, DIRTY_SUFFIX

log = logging.getLogger("opensmc.receiver")

__all__ = ["BuildError", "FsSpec", "build"]

INDEX_SUFFIX = ".fidx"
_LABEL = re.compile(r"^[\x20-\x7e]{0,16}$")
_FEATURE = re.compile(r"^[a-z0-9_]{1,32}$")
#: features mke2fs takes from the source; others (mmp, encrypt, casefold…) are refused, not dropped silently
KNOWN_FEATURES = frozenset(
    """has_journal ext_attr resize_inode dir_index sparse_super2 orphan_file filetype extent extents 64bit
    flex_bg metadata_csum_seed inline_data large_dir ea_inode meta_bg sparse_super large_file huge_file
    dir_nlink extra_isize quota metadata_csum project uninit_bg bigalloc stable_inodes verity""".split()
)
_READ = 4 * 1024 * 1024
MAX_SIZE = 64 * 1024**4


class BuildError(Exception):
    """The filesystem could not be built; ``code`` and a message that says why and what to do."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class FsSpec:
    fs_type: str
    size: int
    uuid: str
    label: str
    block_size: int
    inode_size: int
    features: tuple[str, ...]

    @classmethod
    def parse(cls, doc: Any) -> FsSpec:
        """From the agent's JSON, every field checked (they become mke2fs arguments)."""
        if not isinstance(doc, dict):
            raise BuildError("Build.Invalid", "the body must be a JSON object")
        fs_type = doc.get("fs_type")
        if fs_type not in ("ext2", "ext3", "ext4"):
            raise BuildError("Build.Invalid", f"fs_type {fs_type!r}: ext2, ext3 or ext4")
        size = doc.get("size")
        if not isinstance(size, int) or not 1024 * 1024 <= size <= MAX_SIZE:
            raise BuildError("Build.Invalid", f"size {size!r}: bytes, 1 MiB to 64 TiB")
        try:
            fs_uuid = str(uuid_mod.UUID(str(doc.get("uuid"))))
        except ValueError:
            raise BuildError("Build.Invalid", f"uuid {doc.get('uuid')!r} is not a UUID") from None
        label = doc.get("label") or ""
        if not isinstance(label, str) or not _LABEL.match(label):
            raise BuildError("Build.Invalid", "label: at most 16 printable ASCII characters")
        bs = doc.get("block_size")
        if bs not in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
            raise BuildError("Build.Invalid", f"block_size {bs!r}")
        isz = doc.get("inode_size")
        if isz not in (128, 256, 512, 1024):
            raise BuildError("Build.Invalid", f"inode_size {isz!r}")
        feats = doc.get("features") or []
        if not isinstance(feats, list) or not all(isinstance(f, str) and _FEATURE.match(f) for f in feats):
            raise BuildError("Build.Invalid", "features: a list of feature names")
        unknown = sorted(set(feats) - KNOWN_FEATURES)
        if unknown:
            raise BuildError(
                "Build.UnsupportedFeature",
                f"the source filesystem uses {', '.join(unknown)}, which OpenSMC does not rebuild: copy this "
                "partition block by block (Block=true)",
            )
        return cls(fs_type, size, fs_uuid, label, bs, isz, tuple(feats))

    def mke2fs(self, tree: Path, image: Path) -> list[str]:
        cmd = ["mke2fs", "-q", "-F", "-t", self.fs_type, "-b", str(self.block_size), "-I", str(self.inode_size)]
        cmd += ["-U", self.uuid, "-L", self.label]
        if self.features:
            # "none" first: the source's features exactly, not mke2fs.conf's defaults plus them
            cmd += ["-O", ",".join(("none", *self.features))]
        # The image file is new and sparse, so it reads as zeros: nothing needs zeroing or discarding.
        cmd += ["-E", "assume_storage_prezeroed=1,nodiscard", "-d", str(tree), str(image), f"{self.size // 1024}k"]
        return cmd


def tree_bytes(tree: Path) -> int:
    """What the tree's files take (``du``), for the message when they do not fit."""
    try:
        out = subprocess.run(["du", "-sxb", str(tree)], capture_output=True, text=True, timeout=600, check=True)
        return int(out.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


def build(root: Path, vid: str, tree: Path, spec: FsSpec, repo: Repository, chunk_size: int) -> dict[str, int]:
    """Build the filesystem of ``tree`` and record it as the staging index ``<vid>.fidx``.

    When the last build left its image and every rsync since then itemized what it changed, the
    image is patched (``receiver/patch.py``); otherwise, or when the patch cannot be exact, the
    whole filesystem is built again."""
    if not tree.is_dir():
        raise BuildError("Build.NoTree", f"no files were received for {vid} yet: send them first (rsync)", 409)
    if shutil.which("mke2fs") is None:
        raise BuildError("Build.ToolMissing", "mke2fs (e2fsprogs) is not installed on the receiver host", 501)
    kept = Kept(root, vid)
    _wait_kept(kept)
    why = kept.why_not(spec, chunk_size)
    if why is None:
        try:
            return _patch(root, vid, tree, spec, repo, chunk_size, kept)
        except CannotPatch as e:
            why = str(e)
    if why != NO_PREVIOUS:
        log.warning("volume %s: the whole filesystem is built again, not patched: %s", vid, why)
    return _full(root, vid, tree, spec, repo, chunk_size, kept)


#: :meth:`Kept.why_not` for a first build (nothing to patch: not worth a warning)
NO_PREVIOUS = "no previous build"


class Kept:
    """What a build keeps for the next one to patch, beside the partition's tree (released with it).

    ``<vid>.img`` the image, ``<vid>.img.json`` what it was built as (and on which boot: an image
    written since the last reboot may have lost unsynced pages, so it is not trusted across one),
    ``<vid>.changes`` rsync's itemized changes since, ``<vid>.rsync-dirty`` while an rsync runs or
    after one failed (its log may miss changes), ``<vid>.patching`` while a patch runs."""

    def __init__(self, root: Path, vid: str) -> None:
        self.image = root / f"{vid}.img"
        self.state = root / f"{vid}.img.json"
        self.changes = root / f"{vid}{CHANGES_SUFFIX}"
        self.dirty = root / f"{vid}{DIRTY_SUFFIX}"
        self.patching = root / f"{vid}.patching"
        self.undo = root / f"{vid}.undo"
        self.index = root / f"{vid}{INDEX_SUFFIX}"

    def why_not(self, spec: FsSpec, chunk_size: int) -> str | None:
        """None when the kept image can be patched, else why not."""
        if not self.state.exists() and not self.image.exists():
            return NO_PREVIOUS
        if self.patching.exists():
            return "a patch of the last image was interrupted"
        if self.dirty.exists():
            return "an rsync since the last build did not finish, so its change log may be incomplete"
        try:
            state = json.loads(self.state.read_text())
        except (OSError, ValueError):
            return "the last build's record is missing or unreadable"
        if state.get("spec") != _spec_doc(spec) or state.get("chunk_size") != chunk_size:
            return "the filesystem asked for differs from the last build's"
        if state.get("boot_id") != _boot_id():
            return "the host rebooted since the last build (its image may have lost unsynced writes)"
        try:
            if self.image.stat().st_size != spec.size or not self.index.exists():
                return "the last build's image or index is missing or of another size"
            if state.get("index") != index_digest(self.index):
                return "the staging index is not the one the last image was recorded with"
        except OSError:
            return "the last build's image is missing"
        return None

    def forget(self) -> None:
        for p in (self.state, self.image, self.undo):
            p.unlink(missing_ok=True)


def _spec_doc(spec: FsSpec) -> dict[str, Any]:
    return {
        "fs_type": spec.fs_type,
        "size": spec.size,
        "uuid": spec.uuid,
        "label": spec.label,
        "block_size": spec.block_size,
        "inode_size": spec.inode_size,
        "features": list(spec.features),
    }


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _full(
    root: Path, vid: str, tree: Path, spec: FsSpec, repo: Repository, chunk_size: int, kept: Kept
) -> dict[str, int]:
    t0 = time.monotonic()
    kept.forget()  # from here until the end the kept image is not the index's: none is kept
    kept.patching.unlink(missing_ok=True)  # an interrupted patch's image is gone with it
    changes_size = kept.changes.stat().st_size if kept.changes.exists() else 0
    scratch = _scratch_dir(root, spec.size)
    _drop_leftovers(root, scratch)
    image = scratch / f".{vid}.img"
    image.unlink(missing_ok=True)
    with image.open("wb") as f:
        f.truncate(spec.size)
    handed_off = False  # to the thread that keeps it (then it deletes it)
    try:
        done = subprocess.run(spec.mke2fs(tree, image), capture_output=True, text=True, timeout=24 * 3600)
        if done.returncode != 0:
            text = (done.stderr or done.stdout).strip()
            if "allocate" in text or "No space" in text or "Could not" in text:
                need = tree_bytes(tree)
                least = need * 11 // 10 + 64 * 1024 * 1024
                raise BuildError(
                    "Build.TooSmall",
                    f"the partition's files ({need} bytes) do not fit in a {spec.size}-byte filesystem: give the "
                    f"partition a larger SizeBytes (at least {least} bytes) ({text[-300:]})",
                )
            raise BuildError("Build.Failed", f"mke2fs failed: {text[-500:]}", 500)
        _root_inode(tree, image)
        t1 = time.monotonic()
        new = root / f"{vid}.new{INDEX_SUFFIX}"
        vol = StagingIndex.create(new, spec.size, chunk_size)
        data = 0
        try:
            with image.open("rb") as f:
                fd = f.fileno()
                buf = bytearray(_READ)
                for start, end in _extents(fd, spec.size):
                    # whole chunks around the extent (two extents in one chunk write it twice: harmless)
                    lo, hi = start // chunk_size * chunk_size, min(-(-end // chunk_size) * chunk_size, spec.size)
                    data += _store_range(fd, lo, hi, vol, repo, buf)
            vol.checkpoint(repo)
        finally:
            vol.close()
        digest = index_digest(new)
        os.replace(new, kept.index)
        _consumed(kept, changes_size)
        kept.dirty.unlink(missing_ok=True)  # the whole tree is in this image, whatever its log missed
        if scratch == root:
            os.replace(image, kept.image)
            _write_state(kept, spec, chunk_size, digest)
        else:
            # Kept on the staging disk by a thread, after the build has answered: the copy is not the run's
            # to wait for. The record comes last, so a copy cut short is never patched (nor a later build's).
            _keep_later(image, scratch, kept, spec, chunk_size, digest)
            handed_off = True
    finally:
        if not handed_off:
            image.unlink(missing_ok=True)
        if scratch != root and not handed_off:
            try:
                scratch.rmdir()  # only when empty: another build of this installation may be running
            except OSError:
                pass
    t2 = time.monotonic()
    log.info(
        "volume %s: %s filesystem of %d bytes built (%d bytes of data): mke2fs %.2f s, into the store %.2f s",
        vid,
        spec.fs_type,
        spec.size,
        data,
        t1 - t0,
        t2 - t1,
    )
    return {"size": spec.size, "bytes": data, "patched": 0}


_keeping: dict[Path, threading.Thread] = {}
_keeping_lock = threading.Lock()


def _keep_later(image: Path, scratch: Path, kept: Kept, spec: FsSpec, chunk_size: int, digest: str) -> None:
    def run() -> None:
        tmp = kept.image.with_name(kept.image.name + ".tmp")
        try:
            with image.open("rb") as src, tmp.open("wb") as dst:
                dst.truncate(spec.size)
                for start, end in _extents(src.fileno(), spec.size):
                    pos = start
                    os.lseek(dst.fileno(), pos, os.SEEK_SET)
                    while pos < end:  # in the kernel: tmpfs to the staging disk is "cross-device" for copy_file_range
                        n = os.sendfile(dst.fileno(), src.fileno(), pos, min(end - pos, 1 << 30))
                        if n <= 0:
                            raise OSError(f"sendfile copied nothing at {pos}")
                        pos += n
            os.replace(tmp, kept.image)
            _write_state(kept, spec, chunk_size, digest)
        except OSError as e:  # the staging released meanwhile, or no space: the next build is a full one
            log.warning("%s: the image is not kept for the next build to patch: %s", kept.image.name, e)
            tmp.unlink(missing_ok=True)
        finally:
            image.unlink(missing_ok=True)
            try:
                scratch.rmdir()
            except OSError:
                pass

    thread = threading.Thread(target=run, name=f"keep-{kept.image.name}", daemon=True)
    with _keeping_lock:
        _keeping[kept.image] = thread
    thread.start()


def _wait_kept(kept: Kept) -> None:
    """A build waits for the last one's image to be kept (it patches it, or replaces it)."""
    with _keeping_lock:
        thread = _keeping.pop(kept.image, None)
    if thread is not None:
        thread.join()


def _consumed(kept: Kept, size: int) -> None:
    """The change log up to ``size`` bytes is in the image now: drop it (what rsync appended since stays)."""
    try:
        with kept.changes.open("rb") as f:
            f.seek(size)
            rest = f.read()
    except FileNotFoundError:
        rest = b""
    if rest:
        tmp = kept.changes.with_name(kept.changes.name + ".tmp")
        tmp.write_bytes(rest)
        os.replace(tmp, kept.changes)
    else:
        kept.changes.unlink(missing_ok=True)


def index_digest(path: Path) -> str:
    """What the record of a kept image names its index by: the image is patched only with that index."""
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while block := f.read(_READ):
            h.update(block)
    return h.hexdigest()


def _write_state(kept: Kept, spec: FsSpec, chunk_size: int, index: str) -> None:
    tmp = kept.state.with_name(kept.state.name + ".tmp")
    doc = {"spec": _spec_doc(spec), "chunk_size": chunk_size, "boot_id": _boot_id(), "index": index}
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, kept.state)


#: a change bigger than this share of the image's data is cheaper built again than patched
PATCH_MAX_SHARE = 0.5


def _patch(
    root: Path, vid: str, tree: Path, spec: FsSpec, repo: Repository, chunk_size: int, kept: Kept
) -> dict[str, int]:
    t0 = time.monotonic()
    try:
        raw = kept.changes.read_bytes()
    except FileNotFoundError:
        raw = b""
    items = patch.parse_log(raw)
    with tempfile.TemporaryDirectory(prefix="opensmc-patch-", dir=root) as tmp:
        values = Path(tmp)
        plan = patch.plan(items, tree, values, functools.partial(_listing, kept.image))
        used = kept.image.stat().st_blocks * 512
        if plan.data_bytes > PATCH_MAX_SHARE * used:
            raise CannotPatch(f"{plan.data_bytes} bytes of files changed, more than half the image's {used}")
        for name, value in plan.values.items():
            (values / name).write_bytes(value)
        commands = plan.commands
        if plan.replace_xattrs:
            commands = _with_xattr_removals(kept.image, commands, plan.replace_xattrs)
        script = values / "cmds"
        script.write_text("\n".join(commands) + "\n", errors="surrogateescape")
        # from here the kept image is not the index's until the new index is in place
        fd = os.open(kept.patching, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fsync(fd)
        os.close(fd)
        fsync_dir(root)
        kept.undo.unlink(missing_ok=True)
        if commands:
            done = subprocess.run(
                ["debugfs", "-w", "-z", str(kept.undo), "-f", str(script), str(kept.image)],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=24 * 3600,
            )
            errors = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("debugfs ")]
            if done.returncode != 0 or errors:
                shutil.copyfile(script, "/tmp/files2-failed.cmds")  # DEBUG
                kept.forget()
                raise CannotPatch(f"debugfs: {' / '.join(errors)[:500] or done.returncode}")
            ranges = patch.changed_ranges(kept.undo.read_bytes()) if kept.undo.exists() else []
        else:
            ranges = []
        crash_point("build.patched")
    t1 = time.monotonic()
    chunks = {0}  # the superblock's: debugfs stamps its write time
    for off, length in ranges:
        chunks.update(range(off // chunk_size, (off + length - 1) // chunk_size + 1))
    new = root / f"{vid}.new{INDEX_SUFFIX}"
    shutil.copyfile(kept.index, new)
    vol = StagingIndex.open(new)
    data = 0
    try:
        with kept.image.open("rb") as f:
            fd = f.fileno()
            buf = bytearray(_READ)
            for first, count in _runs(sorted(c for c in chunks if c * chunk_size < spec.size)):
                end = min((first + count) * chunk_size, spec.size)
                data += _store_range(fd, first * chunk_size, end, vol, repo, buf)
        vol.checkpoint(repo)
    finally:
        vol.close()
    digest = index_digest(new)
    os.replace(new, kept.index)
    _write_state(kept, spec, chunk_size, digest)  # (a crash before this: the index is not the record's)
    _consumed(kept, len(raw))
    kept.undo.unlink(missing_ok=True)
    kept.patching.unlink()
    t2 = time.monotonic()
    log.info(
        "volume %s: %s filesystem of %d bytes patched (%d changes, %d bytes of files; %d chunks, %d bytes "
        "read again): debugfs %.2f s, into the store %.2f s",
        vid,
        spec.fs_type,
        spec.size,
        plan.items,
        plan.data_bytes,
        len(chunks),
        data,
        t1 - t0,
        t2 - t1,
    )
    return {"size": spec.size, "bytes": data, "patched": 1}


def _runs(chunks: list[int]) -> list[tuple[int, int]]:
    """Sorted chunk numbers as (first, count) runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for c in chunks:
        if out and out[-1][0] + out[-1][1] == c:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out


def _listing(image: Path, dirs: list[str]) -> dict[str, dict[str, bool]]:
    """:data:`patch.Listing` of ``image``, read with one debugfs."""
    if not dirs:
        return {}
    out = _debugfs_each(image, [f'ls -p "{d}"' for d in dirs])
    return {d: patch.parse_ls(text) for d, text in zip(dirs, out, strict=True)}


def _debugfs_each(image: Path, commands: list[str]) -> list[str]:
    """What each of ``commands`` printed, run read-only in one debugfs (names are quotable: see patch.py)."""
    with tempfile.NamedTemporaryFile("w", suffix=".cmds", delete=False, errors="surrogateescape") as f:
        f.write("".join(c + "\n" for c in commands))
        name = f.name
    try:
        done = subprocess.run(["debugfs", "-f", name, str(image)], capture_output=True, text=True, errors="replace")
    finally:
        os.unlink(name)
    parts = done.stdout.split("debugfs: ")[1:]
    if done.returncode != 0 or len(parts) != len(commands):
        raise CannotPatch(f"debugfs could not read the last image: {done.stderr[-300:]}")
    return [p.split("\n", 1)[1] if "\n" in p else "" for p in parts]


def _with_xattr_removals(image: Path, commands: list[str], paths: list[str]) -> list[str]:
    """The placeholders of entries whose xattrs are replaced, as ``ea_rm`` of the names the image has."""
    listings = _debugfs_each(image, [f'ea_list "{p}"' for p in paths])
    names = {p: patch.xattr_names(text) for p, text in zip(paths, listings, strict=True)}
    out = []
    for c in commands:
        if c.startswith("#XATTRS-OF "):
            p = c.removeprefix("#XATTRS-OF ")
            if names[p]:
                out.append(f'ea_rm "{p}" {" ".join(names[p])}')
        else:
            out.append(c)
    return out


#: where a build's image file goes when memory allows: it lives seconds, and on disk its dirty pages
#: would be written back while the store writes the same bytes into packs
_SCRATCH = Path("/dev/shm")


def _scratch_dir(root: Path, size: int) -> Path:
    """tmpfs when it and the free memory hold the whole filesystem with 1 GiB to spare, else ``root``."""
    try:
        st = os.statvfs(_SCRATCH)
        meminfo = Path("/proc/meminfo").read_text()
        avail = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return root
    if st.f_bavail * st.f_frsize >= size + 2**30 and avail >= size + 2**30 and os.access(_SCRATCH, os.W_OK):
        # one directory per staging directory: leftovers are only ever this installation's
        mine = _SCRATCH / f"opensmc-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]}"
        try:
            mine.mkdir(mode=0o700, exist_ok=True)
            return mine
        except OSError:
            return root
    return root


def _drop_leftovers(root: Path, scratch: Path) -> None:
    """Image files a killed build left behind (in tmpfs they hold memory) whose job's staging is gone."""
    for left in scratch.glob(".ti-*.p*.img"):
        disk_vid = left.name[1:].removesuffix(".img").rsplit(".p", 1)[0]
        if not (root / f"{disk_vid}{INDEX_SUFFIX}").exists():
            left.unlink(missing_ok=True)


def _root_inode(tree: Path, image: Path) -> None:
    """mke2fs -d gives the root directory 0755 root:root: give it the source's mode, owner, mtime, xattrs."""
    st = os.lstat(tree)
    cmds = [
        f"sif / mode 0{stat.S_IFDIR | stat.S_IMODE(st.st_mode):o}",
        f"sif / uid {st.st_uid}",
        f"sif / gid {st.st_gid}",
        f"sif / mtime @{int(st.st_mtime)}",
    ]
    with tempfile.TemporaryDirectory(prefix="opensmc-root-") as tmp:
        for n, name in enumerate(os.listxattr(tree, follow_symlinks=False)):
            value = Path(tmp) / str(n)
            value.write_bytes(os.getxattr(tree, name, follow_symlinks=False))
            cmds.append(f"ea_set -f {value} / {name}")
        script = Path(tmp) / "cmds"
        script.write_text("\n".join(cmds) + "\n")
        done = subprocess.run(["debugfs", "-w", "-f", str(script), str(image)], capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError("Build.Failed", f"debugfs could not set the root directory: {done.stderr[-300:]}", 500)


def _store_range(fd: int, lo: int, hi: int, vol: StagingIndex, repo: Repository, buf: bytearray) -> int:
    """Read ``[lo, hi)`` of the image into the store through ``buf``; the bytes read.

    One buffer for the whole image: a new 4 MiB ``bytes`` a read (``os.pread``) cost a page
    fault per 4 KiB of it. The store is done with a buffer's bytes when ``write`` returns
    (a pack's blobs are written out before ``put_many`` returns), so it can be read into again.
    """
    view = memoryview(buf)
    done = 0
    pos = lo
    while pos < hi:
        n = os.preadv(fd, [view[: min(len(buf), hi - pos)]], pos)
        if n <= 0:
            raise BuildError("Build.Failed", f"the image ended at {pos}, before {hi}", 500)
        vol.write(repo, pos, view[:n])
        done += n
        pos += n
    return done


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The data extents of a sparse file (SEEK_DATA/SEEK_HOLE), merged."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            return [(0, size)]  # no SEEK_DATA here: read it all
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, min(end, size)))
        pos = end
    return out
