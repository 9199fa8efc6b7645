"""Sealing a disk that has partitions copied file by file: its image disk, composed from chunks.

The block pass staged the disk at the source's layout, with the file-level
partitions left out; each file-level partition has its new filesystem staged
on its own (``receiver/filesystems.py``). The image disk follows the job's
layout (``domain/file_layout.py``): the region before the first partition (the
MBR, GRUB's core image in the MBR gap, the GPT), each block partition at its
new place, each new filesystem at its place, and the partition table
rewritten for the new starts and sizes by ``sfdisk`` from the source's own
dump (label id, partition UUIDs, types, names and attributes kept; the boot
code in the first 440 bytes restored after). Chunk-aligned pieces, which a
layout moved by whole MiB always gives, are copied as digests: no data is
read or written for them; only the chunks the partition table touches, and
any unaligned edge, become new blobs.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import xxhash

from opensmc.chunkstore.snapshots import DiskIndex, chunks_of
from opensmc.domain.file_layout import GPT_TAIL_SECTORS, Layout
from opensmc.images.store import ImageError, ImageStore

__all__ = ["compose"]

_BOOT_CODE = 440  # bytes of an MBR before the disk signature and the partition entries


class _Builder:
    """A new disk index, written piece by piece; later pieces win."""

    def __init__(self, store: ImageStore, size: int, chunk_size: int) -> None:
        self.store = store
        self.size = size
        self.cs = chunk_size
        self.digests = np.zeros((chunks_of(size, chunk_size), 16), dtype=np.uint8)
        self.partial: dict[int, bytearray] = {}

    def _chunk_len(self, idx: int) -> int:
        return min(self.cs, self.size - idx * self.cs)

    def copy(self, dst: int, src: DiskIndex, src_off: int, length: int) -> None:
        length = max(0, min(length, src.size - src_off, self.size - dst))
        cs = self.cs
        if src.chunk_size == cs and dst % cs == 0 and src_off % cs == 0:
            full = length // cs
            di, si = dst // cs, src_off // cs
            full = min(full, src.chunks - si)
            self.digests[di : di + full] = src.digests[si : si + full]
            for idx in range(di, di + full):
                self.partial.pop(idx, None)
            done = full * cs
        else:
            done = 0
        step = 4 * 1024 * 1024
        while done < length:
            n = min(step, length - done)
            self.write(dst + done, read_range(self.store, src, src_off + done, n))
            done += n

    def write(self, dst: int, data: bytes) -> None:
        cs = self.cs
        pos = 0
        while pos < len(data):
            idx = (dst + pos) // cs
            lo = (dst + pos) - idx * cs
            n = min(cs - lo, len(data) - pos)
            buf = self.partial.get(idx)
            if buf is None:
                h = self.digests[idx]
                buf = bytearray(self.store.read_chunk(bytes(h)) if h.any() else bytes(self._chunk_len(idx)))
                self.partial[idx] = buf
            buf[lo : lo + n] = data[pos : pos + n]
            pos += n

    def finish(self) -> DiskIndex:
        repo = self.store.repo
        for idx, buf in self.partial.items():
            data = bytes(buf[: self._chunk_len(idx)])
            if not any(data):
                self.digests[idx] = 0
                continue
            digest = xxhash.xxh3_128_digest(data)
            repo.put(digest, data, compress=True)
            self.digests[idx] = np.frombuffer(digest, dtype=np.uint8)
        repo.flush()  # durable before a snapshot names them (store-format.md §7)
        return DiskIndex(self.size, self.cs, self.digests, None)


def read_range(store: ImageStore, disk: DiskIndex, offset: int, length: int) -> bytes:
    """Bytes ``[offset, offset+length)`` of a staged disk (zeros past its end)."""
    out = bytearray()
    cs = disk.chunk_size
    pos = offset
    end = offset + length
    while pos < end:
        idx = pos // cs
        if idx >= disk.chunks:
            out += bytes(end - pos)
            break
        h = disk.hash_at(idx)
        chunk = store.read_chunk(h) if h is not None else bytes(disk.chunk_length(idx))
        lo = pos - idx * cs
        piece = chunk[lo : lo + (end - pos)]
        out += piece
        pos += len(piece)
        if not piece:
            out += bytes(end - pos)
            break
    return bytes(out)


def compose(store: ImageStore, layout: Layout, staged: DiskIndex, parts: dict[str, DiskIndex]) -> DiskIndex:
    """The image disk of ``layout``: call it inside ``store.repo.session()`` (its new blobs need a snapshot)."""
    b = _Builder(store, layout.size, staged.chunk_size)
    first = min((m.src_offset for m in layout.parts), default=staged.size)
    b.copy(0, staged, 0, first)  # MBR, its gap (GRUB's core image), the GPT: block by block
    for m in layout.parts:
        if m.file_level:
            fs = parts.get(m.device)
            if fs is None:
                raise ImageError(f"partition {m.device} was copied file by file but its filesystem was not built")
            if fs.size != m.dst_size:
                raise ImageError(
                    f"partition {m.device}: its filesystem is {fs.size} bytes, the layout says {m.dst_size}"
                )
            b.copy(m.dst_offset, fs, 0, m.dst_size)
        else:
            b.copy(m.dst_offset, staged, m.src_offset, m.src_size)
    last_end = max((m.dst_offset + m.dst_size for m in layout.parts), default=first)
    needs_table = layout.label is not None and (
        layout.moved or (layout.label == "gpt" and layout.size != layout.src_size)
    )
    if not needs_table:
        src_end = max((m.src_offset + m.src_size for m in layout.parts), default=first)
        b.copy(src_end, staged, src_end, layout.src_size - src_end)  # what follows the last partition
    else:
        head = read_range(store, staged, 0, first)
        for offset, data in rewrite_table(head, layout, last_end):
            b.write(offset, data)
    return b.finish()


_PART_LINE = re.compile(r"^(?P<node>\S+)\s*:\s*(?P<fields>.*)$")


def rewrite_table(head: bytes, layout: Layout, last_end: int) -> list[tuple[int, bytes]]:
    """The partition table for ``layout``, by sfdisk: (offset, bytes) to write over the new disk."""
    ss = layout.sector_size
    with tempfile.TemporaryDirectory(prefix="opensmc-table-") as tmp:
        src, dst = Path(tmp) / "src.img", Path(tmp) / "dst.img"
        with src.open("wb") as f:
            f.truncate(layout.src_size)
            f.write(head)
        dump = _sfdisk(["--dump", str(src)])
        by_start = {m.src_offset // ss: m for m in layout.parts}
        lines: list[str] = []
        for line in dump.splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("device", "last-lba"):
                continue  # another file; the end follows the new size
            match = _PART_LINE.match(line)
            if match and "start=" in line:
                fields = [f.strip() for f in match.group("fields").split(",")]
                start = int(next(f for f in fields if f.startswith("start=")).split("=")[1])
                m = by_start.get(start)
                if m is None:
                    raise ImageError(f"sfdisk lists a partition at sector {start} that discovery did not report")
                fields = [
                    f"start={m.dst_offset // ss}"
                    if f.startswith("start=")
                    else f"size={m.dst_size // ss}"
                    if f.startswith("size=")
                    else f
                    for f in fields
                ]
                line = f"{dst}{m.number} : " + ", ".join(fields)
            lines.append(line)
        with dst.open("wb") as f:
            f.truncate(layout.size)
            f.write(head)
        _sfdisk(["--no-reread", "--no-tell-kernel", "--wipe", "never", "-q", str(dst)], "\n".join(lines) + "\n")
        with dst.open("r+b") as g:
            g.write(head[:_BOOT_CODE])  # sfdisk may clear the boot code; GRUB's boot.img lives there
            g.seek(0)
            new_head = g.read(len(head))
            out = [(0, new_head)]
            if layout.label == "gpt":
                tail = max(last_end, layout.size - GPT_TAIL_SECTORS * ss)
                g.seek(tail)
                out.append((tail, g.read(layout.size - tail)))
    return out


def _sfdisk(args: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(["sfdisk", *args], input=stdin, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ImageError(
            "sfdisk (util-linux fdisk) is not installed on this host: it rewrites partition tables"
        ) from None
    if done.returncode != 0:
        raise ImageError(f"sfdisk {' '.join(args[:1])} failed: {(done.stderr or done.stdout).strip()[-400:]}")
    return done.stdout
