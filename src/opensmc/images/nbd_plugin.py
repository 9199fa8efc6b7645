"""An nbdkit plugin (nbdkit's python plugin runs this file) serving one disk of an image, read-only.

    nbdkit -r python opensmc/images/nbd_plugin.py store=DIR image=m-… disk=N pythonpath=…

Every read is answered from the chunk store through :class:`ImageStore`:
nothing is exported or copied, a zero chunk costs nothing, and every blob is
re-hashed as it is read (a damaged one fails the read with EIO and a message
in nbdkit's log, never hands out wrong bytes). nbdkit embeds the system's
Python, not OpenSMC's virtualenv, so ``pythonpath`` (``os.pathsep``-separated)
carries the importing process's ``sys.path`` and OpenSMC and its libraries
are imported only once it is known (``config_complete``).

:mod:`opensmc.images.nbd` starts nbdkit with this plugin; the functions here
are nbdkit's python plugin API, version 2.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

API_VERSION = 2

#: chunks kept decoded: a guest reads sectors in small pieces, often the same chunk many times
CACHE_CHUNKS = 512

_config: dict[str, str] = {}
_disk: Any = None
_store: Any = None
_cache: OrderedDict[int, bytes] = OrderedDict()


def config(key: str, value: str) -> None:
    if key not in ("store", "image", "disk", "pythonpath"):
        raise RuntimeError(f"unknown parameter {key!r}: give store=, image=, disk= and pythonpath=")
    _config[key] = value


def config_complete() -> None:
    global _disk, _store
    missing = [k for k in ("store", "image", "disk") if k not in _config]
    if missing:
        raise RuntimeError(f"missing parameter(s): {', '.join(missing)}")
    for entry in reversed(_config.get("pythonpath", "").split(":")):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    from opensmc.images.store import ImageStore

    _store = ImageStore(_config["store"])
    disks = _store.get(_config["image"]).disks
    position = int(_config["disk"])
    if not 0 <= position < len(disks):
        raise RuntimeError(f"image {_config['image']} has no disk {position} (it has {len(disks)})")
    _disk = disks[position].index


def thread_model() -> int:
    import nbdkit  # type: ignore[import-not-found]  # the module nbdkit's embedded Python provides

    return int(nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS)  # one chunk cache, one Repository view


def open(readonly: bool) -> int:  # shadows the builtin: the name nbdkit calls
    return 1


def get_size(h: int) -> int:
    return int(_disk.size)


def can_write(h: int) -> bool:
    return False  # an image is immutable; a guest that writes needs a copy-on-write overlay (qemu snapshot=on)


def can_multi_conn(h: int) -> bool:
    return True  # read-only: every connection sees the same bytes


def can_cache(h: int) -> int:
    import nbdkit

    return int(nbdkit.CACHE_NONE)


def _chunk(i: int) -> bytes:
    data = _cache.get(i)
    if data is not None:
        _cache.move_to_end(i)
        return data
    n = _disk.chunk_length(i)
    h = _disk.hash_at(i)
    data = bytes(n) if h is None else _store.read_chunk(h)
    if len(data) != n:
        raise RuntimeError(f"chunk {i} of image {_config['image']} has {len(data)} bytes, not {n}")
    _cache[i] = data
    if len(_cache) > CACHE_CHUNKS:
        _cache.popitem(last=False)
    return data


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    cs = _disk.chunk_size
    end = offset + len(buf)
    pos = offset
    while pos < end:
        i = pos // cs
        data = _chunk(i)
        start = pos - i * cs
        take = min(end - pos, len(data) - start)
        buf[pos - offset : pos - offset + take] = data[start : start + take]
        pos += take


def extents(h: int, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    """Zero chunks are holes: a client (qemu-img convert, nbdcopy) skips them without reading."""
    import nbdkit

    cs = _disk.chunk_size
    out: list[tuple[int, int, int]] = []
    first = offset // cs
    last = min(_disk.chunks, -(-(offset + count) // cs))
    for i in range(first, last):
        start = max(offset, i * cs)
        length = min((i + 1) * cs, _disk.size) - start
        kind = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO if _disk.hash_at(i) is None else 0
        if out and out[-1][2] == kind:
            out[-1] = (out[-1][0], out[-1][1] + length, kind)
        else:
            out.append((start, length, kind))
    return out


def can_extents(h: int) -> bool:
    return True
