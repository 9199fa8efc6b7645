"""The receiver's HTTP listener: the agent↔receiver protocol, version 1 (docs/protocol.md).

aiohttp on the stock asyncio loop, because it moves bulk bodies 2-3x faster
than uvicorn on loopback (PERF_FLOORS.md). Every request must carry
``X-OpenSMC-Protocol: 1`` and ``Authorization: Bearer <token>``; the token is
checked by the ``authorize(token, volume_id)`` callback the caller supplies
(the control plane backs it with a per-job expiring credential).

Frames are read from the body into a few reused buffers (``framing.py``),
verified, then written into the chunk store: each chunk becomes a blob
(stored once, however many disks or runs have it) and the disk's staging
index records which blob it is (``opensmc.chunkstore.staging``). The verify+write of a group of frames runs
on a worker thread while the next is read off the socket. The first bad
frame stops the request with 400 and nothing from it onward is written; the
frames before it stay written (each was whole and verified), and replaying
them later is harmless. ``flush`` makes everything durable; a staging index
idle for :data:`IDLE_CLOSE` seconds (an agent killed mid-run) is
checkpointed and closed, which also lets garbage collection run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from aiohttp import web

from opensmc.chunkstore.repository import Repository, StoreError
from opensmc.chunkstore.staging import StagingError, StagingIndex
from opensmc.receiver import filesystems, rsync
from opensmc.receiver.framing import BodyReader, BufferPool
from opensmc.receiver.space import DiskFull, OnFull, SpaceGuard, is_disk_full
from opensmc.receiver.stats import STATS
from opensmc.wire.frames import (
    HEADER_SIZE,
    FrameError,
    FrameHeader,
    decode_payload,
    encode_hash_array,
)

log = logging.getLogger("opensmc.receiver")

__all__ = ["HASHMAP_CONTENT_TYPE", "PROTOCOL_HEADER", "PROTOCOL_VERSION", "make_app"]

PROTOCOL_HEADER = "X-OpenSMC-Protocol"
PROTOCOL_VERSION = "1"
HASHMAP_CONTENT_TYPE = "application/vnd.opensmc.hashmap.v1"
FRAMES_CONTENT_TYPE = "application/vnd.opensmc.frames.v1"
_VID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Authorize = Callable[[str, str], bool]
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_VOLUMES = web.AppKey("volumes", dict[str, StagingIndex])
_REPO = web.AppKey("repo", Repository)
_USED = web.AppKey("used", dict[str, float])
_SWEEPER = web.AppKey("sweeper", asyncio.Task[None])
#: seconds without a request after which an open staging index is checkpointed and closed
IDLE_CLOSE = 30.0
INDEX_SUFFIX = ".fidx"
_ROOT = web.AppKey("root", Path)
_AUTHORIZE: web.AppKey[Authorize] = web.AppKey("authorize")
_OPEN_LOCK = web.AppKey("open_lock", asyncio.Lock)
_IDENTS = web.AppKey("idents", dict[str, tuple[int, int]])
_BUFFERS = web.AppKey("buffers", BufferPool)
_SPACE = web.AppKey("space", SpaceGuard)
_ON_FULL: web.AppKey[OnFull] = web.AppKey("on_full")


def _error(status: int, code: str, message: str, **extra: object) -> web.Response:
    body = json.dumps({"code": code, "message": message, **extra})
    return web.Response(
        status=status, text=body, content_type="application/json", headers={PROTOCOL_HEADER: PROTOCOL_VERSION}
    )


@web.middleware
async def _protocol_and_auth(request: web.Request, handler: _Handler) -> web.StreamResponse:
    version = request.headers.get(PROTOCOL_HEADER)
    if version is None:
        return _error(400, "Protocol.Missing", f"the {PROTOCOL_HEADER} header is required (this side speaks 1)")
    if version != PROTOCOL_VERSION:
        return _error(
            400, "Protocol.Unsupported", f"protocol version {version!r} is not supported (this side speaks 1)"
        )
    vid = request.match_info.get("vid", "")
    if not _VID.match(vid):
        return _error(404, "Volume.NotFound", f"no volume {vid!r}")
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _error(401, "Auth.Missing", "send Authorization: Bearer <token>")
    if not request.app[_AUTHORIZE](token.strip(), vid):
        return _error(403, "Auth.Denied", f"the token is not valid for volume {vid!r}, or has expired")
    resp = await handler(request)
    resp.headers[PROTOCOL_HEADER] = PROTOCOL_VERSION
    return resp


async def _volume(request: web.Request) -> StagingIndex | None:
    vid = request.match_info["vid"]
    volumes = request.app[_VOLUMES]
    idents = request.app[_IDENTS]
    path = request.app[_ROOT] / f"{vid}{INDEX_SUFFIX}"
    ident = _identity(path)
    vol = volumes.get(vid)
    if vol is not None and idents.get(vid) == ident:
        request.app[_USED][vid] = asyncio.get_running_loop().time()
        return vol
    async with request.app[_OPEN_LOCK]:
        vol = volumes.get(vid)
        if vol is not None and idents.get(vid) != ident:
            # The control plane released or replaced the volume (a disk that changed
            # size, a finished job): never keep writing into the old, deleted files.
            volumes.pop(vid, None)
            idents.pop(vid, None)
            vol.close()
            vol = None
        if vol is None:
            if ident is None:
                return None
            vol = await asyncio.get_running_loop().run_in_executor(None, StagingIndex.open, path)
            volumes[vid] = vol
            idents[vid] = ident
        request.app[_USED][vid] = asyncio.get_running_loop().time()
    return vol


def _identity(path: Path) -> tuple[int, int] | None:
    """Which staging index a path holds now: its (device, inode), None if none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _not_found(request: web.Request) -> web.Response:
    return _error(404, "Volume.NotFound", f"no volume {request.match_info['vid']!r} on this receiver")


async def get_volume(request: web.Request) -> web.Response:
    vol = await _volume(request)
    if vol is None:
        return _not_found(request)
    info = {"volume_id": request.match_info["vid"], "size": vol.size, "chunk_size": vol.chunk_size}
    return web.json_response(info)


async def get_hashes(request: web.Request) -> web.Response:
    vol = await _volume(request)
    if vol is None:
        return _not_found(request)
    loop = asyncio.get_running_loop()
    if "application/json" in request.headers.get("Accept", ""):  # for people and tests: small disks
        hashes = await loop.run_in_executor(None, vol.hashes)
        body = {"chunk_size": vol.chunk_size, "hashes": {str(i): h.hex() for i, h in sorted(hashes.items())}}
        return web.json_response(body)
    raw = await loop.run_in_executor(None, vol.with_current, lambda d: encode_hash_array(vol.chunk_size, d))
    return web.Response(body=raw, content_type=HASHMAP_CONTENT_TYPE)


#: Small frames are verified and written in groups of about this many bytes, so that an
#: incremental run's thousands of 64 KiB frames do not each pay a hop to a worker thread.
GROUP_BYTES = 2 * 1024 * 1024
#: Body buffers (``framing.py``): a 4 MiB frame, as agents send, and its header fit in one.
BUFFER_BYTES = 4 * 1024 * 1024 + 64 * 1024
#: Free body buffers kept for reuse (two per body being read): up to 8 agents at once reuse theirs.
BUFFERS_KEPT = 16


def _verify_and_write(
    vol: StagingIndex, repo: Repository, group: list[tuple[FrameHeader, memoryview]]
) -> tuple[int, int, FrameError | StagingError | None]:
    """Write the group's frames in order until the first bad one: (frames, plain bytes, error).

    The good frames before a zero frame, a bad one or the group's end go to the index in one
    call (``write_many``): one store call for a group of an incremental run's small frames."""
    frames = plain = 0
    data: list[tuple[int, bytes | memoryview]] = []
    error: FrameError | StagingError | None = None
    for header, payload in group:
        try:
            vol.check(header.offset, header.plain_length)  # cheap, and before decoding
            frame = decode_payload(header, payload)
            if frame.is_zero:
                if data:
                    vol.write_many(repo, data)
                    data = []
                vol.zero(repo, frame.offset, frame.length)
            else:
                data.append((frame.offset, frame.data))
        except (FrameError, StagingError) as e:
            error = e
            break
        frames += 1
        plain += frame.length
    if data:
        vol.write_many(repo, data)
    return frames, plain, error


async def post_frames(request: web.Request) -> web.Response:
    vol = await _volume(request)
    if vol is None:
        return _not_found(request)
    if _SPACE in request.app:
        request.app[_SPACE].check()  # below the reserve: refused before a byte is written (see space.py)
    loop = asyncio.get_running_loop()
    frames = plain = wire = 0
    repo = request.app[_REPO]
    error: FrameError | StagingError | None = None
    pending: asyncio.Future[tuple[int, int, FrameError | StagingError | None]] | None = None
    reader = BodyReader(request.app[_BUFFERS], GROUP_BYTES)
    groups = reader.groups(request.content.iter_any())
    try:
        async for group, parse_error in groups:
            wire += sum(HEADER_SIZE + len(payload) for _h, payload in group)
            # One group on a worker thread while the next is read off the socket.
            if pending is not None:
                n, p, err = await pending
                frames, plain, pending = frames + n, plain + p, None
                if err is not None:
                    error = err
                    break
            if group:
                pending = loop.run_in_executor(None, _verify_and_write, vol, repo, group)
            if parse_error is not None:
                error = parse_error
                break
        if pending is not None:
            n, p, err = await pending
            frames, plain, pending = frames + n, plain + p, None
            error = err or error  # a bad frame in the group came before a later parse error
    finally:
        await groups.aclose()
        if pending is not None:  # the client went away: the worker must be done before the buffers are reused
            await asyncio.wait([pending])
        reader.release()
    STATS.accepted(frames, plain, wire)
    if error is not None:
        STATS.refused(error.code)
        return _error(400, error.code, f"frame #{frames} of the body rejected: {error}", accepted=frames)
    return web.json_response({"frames": frames, "bytes": plain})


@web.middleware
async def _store_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """The store could not write (disk full, store unreachable): a clear 503, not a bare 500."""
    try:
        return await handler(request)
    except (StoreError, OSError, DiskFull) as e:
        if is_disk_full(e):
            return await _disk_full(request, e)
        return _error(503, "Receiver.StoreUnavailable", f"the receiver cannot write to its image store: {e}")


async def _disk_full(request: web.Request, exc: BaseException) -> web.Response:
    """507 ``Receiver.DiskFull``, saying how much this disk still needs; the job turns InError."""
    vid = request.match_info.get("vid", "")
    vol = request.app[_VOLUMES].get(vid)
    loop = asyncio.get_running_loop()
    needed = None if vol is None else await loop.run_in_executor(None, _still_needed, vol)
    space = request.app[_SPACE] if _SPACE in request.app else SpaceGuard([request.app[_ROOT]], 0)
    message = space.message(needed)
    STATS.refused("Receiver.DiskFull")
    if _ON_FULL in request.app:
        try:
            await loop.run_in_executor(None, request.app[_ON_FULL], vid, message)
        except Exception as e:  # the agent still hears the refusal, and reports it itself
            log.warning("volume %s: the disk is full, and marking its job failed did not work: %s", vid, e)
    log.warning("volume %s: refused, the disk is full (%s)", vid, exc)
    return _error(507, "Receiver.DiskFull", message)


def _still_needed(vol: StagingIndex) -> int:
    """Bytes of the volume the receiver holds no durable chunk for (an upper bound of what it still needs)."""
    held = int(np.count_nonzero(vol.disk().digests.any(axis=1)))  # not pending ones: their pack may be lost
    return max(vol.size - held * vol.chunk_size, 0)


async def post_rsync(request: web.Request) -> web.StreamResponse:
    """A partition copied file by file: the agent's rsync stream (``receiver/rsync.py``)."""
    return await rsync.post_rsync(request, request.app[_ROOT])


async def post_build(request: web.Request) -> web.Response:
    """A partition copied file by file: build its filesystem from its tree (``receiver/filesystems.py``)."""
    vid = request.match_info["vid"]
    if not rsync.PART_VID.match(vid):
        return _error(400, "Build.NotAPartition", f"{vid!r} is not a partition's volume (…-dN.pD_N)")
    root = request.app[_ROOT]
    disk_vid = vid.rsplit(".p", 1)[0]
    try:
        with (root / f"{disk_vid}{INDEX_SUFFIX}").open("rb") as f:
            _size, chunk_size = StagingIndex.parse_header(f.read(64))
    except (OSError, StagingError):
        return _not_found(request)
    try:
        spec = filesystems.FsSpec.parse(await request.json())
    except ValueError:
        return _error(400, "Build.Invalid", "the body must be JSON")
    except filesystems.BuildError as e:
        return _error(e.status, e.code, e.message)
    if _SPACE in request.app:
        request.app[_SPACE].check()
    tree = rsync.tree_path(root, vid)
    loop = asyncio.get_running_loop()
    try:
        done = await loop.run_in_executor(
            None, filesystems.build, root, vid, tree, spec, request.app[_REPO], chunk_size
        )
    except filesystems.BuildError as e:
        return _error(e.status, e.code, e.message)
    return web.json_response(done)


async def post_flush(request: web.Request) -> web.Response:
    vol = await _volume(request)
    if vol is None:
        return _not_found(request)
    await asyncio.get_running_loop().run_in_executor(None, vol.checkpoint, request.app[_REPO])
    return web.json_response({"chunks": vol.held()})


def _close(app: web.Application, vid: str) -> None:
    """Checkpoint (if it is still the file the control plane keeps) and close one staging index."""
    vol = app[_VOLUMES].pop(vid)
    ident = app[_IDENTS].pop(vid, None)
    app[_USED].pop(vid, None)
    try:
        if ident is not None and ident == _identity(app[_ROOT] / f"{vid}{INDEX_SUFFIX}"):
            vol.checkpoint(app[_REPO])
    finally:
        vol.close()


async def _sweep_idle(app: web.Application) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(IDLE_CLOSE / 3)
        now = loop.time()
        async with app[_OPEN_LOCK]:
            for vid in [v for v, t in app[_USED].items() if now - t > IDLE_CLOSE and v in app[_VOLUMES]]:
                try:
                    await loop.run_in_executor(None, _close, app, vid)
                except Exception as e:  # the next request reopens it; a run resumes from what is durable
                    app[_VOLUMES].pop(vid, None)
                    app[_IDENTS].pop(vid, None)
                    log.warning("closing idle staging index %s failed: %s", vid, e)


async def _start_sweeper(app: web.Application) -> None:
    app[_SWEEPER] = asyncio.get_running_loop().create_task(_sweep_idle(app))


async def _close_volumes(app: web.Application) -> None:
    app[_SWEEPER].cancel()
    loop = asyncio.get_running_loop()
    for vid in [*app[_VOLUMES].keys()]:
        try:
            await loop.run_in_executor(None, _close, app, vid)
        except Exception as e:  # a pack lost to a full disk: what is durable stays; the next run resends
            log.warning("closing staging index %s failed: %s", vid, e)


def make_app(
    volumes_root: str | Path,
    repo: Repository,
    authorize: Authorize,
    *,
    space: SpaceGuard | None = None,
    on_full: OnFull | None = None,
) -> web.Application:
    """The receiver app for the staging indexes under ``volumes_root`` (``<volume id>.fidx``).

    Staging indexes are created by the control plane (``StagingIndex.create``);
    this app only opens existing ones, and writes the chunks into ``repo``.
    ``authorize(token, volume_id)`` must be cheap and thread-safe: it runs on
    every request. ``space`` keeps a reserve of free disk (``receiver/space.py``); ``on_full``
    hears of every write refused for a full disk.
    """
    app = web.Application(middlewares=[_protocol_and_auth, _store_errors])
    if space is not None:
        app[_SPACE] = space
    if on_full is not None:
        app[_ON_FULL] = on_full
    app[_ROOT] = Path(volumes_root)
    app[_REPO] = repo
    app[_USED] = {}
    app[_AUTHORIZE] = authorize
    app[_VOLUMES] = {}
    app[_OPEN_LOCK] = asyncio.Lock()
    app[_IDENTS] = {}
    app[_BUFFERS] = BufferPool(BUFFER_BYTES, BUFFERS_KEPT)
    app.router.add_get("/v1/volumes/{vid}", get_volume)
    app.router.add_get("/v1/volumes/{vid}/hashes", get_hashes)
    app.router.add_post("/v1/volumes/{vid}/frames", post_frames)
    app.router.add_post("/v1/volumes/{vid}/flush", post_flush)
    app.router.add_post("/v1/volumes/{vid}/rsync", post_rsync)
    app.router.add_post("/v1/volumes/{vid}/build", post_build)
    app.on_startup.append(_start_sweeper)
    app.on_cleanup.append(_close_volumes)
    return app
