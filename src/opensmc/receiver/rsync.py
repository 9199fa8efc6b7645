"""The receiving end of a file-level copy: ``rsync --server`` behind the receiver's credential check.

The agent's rsync reaches this through its remote shell, ``agent/tunnel.py``:
one ``POST /v1/volumes/<partition volume>/rsync``. Over plain TCP the tunnel
asks to upgrade the connection (``Upgrade: opensmc-rsync``): the answer is
``101 Switching Protocols`` and the socket itself becomes the stdin and
stdout of ``rsync --server``, so no byte of the stream passes through this
process (relaying it cost the receiver about a core while rsync ran). Over
TLS, or for a tunnel that does not ask, the chunked request body is what
rsync sends and the chunked response body is what it hears back, relayed
here.
The request passes the same protocol and credential checks as every other
receiver request (the run's data token, scoped to the job's volumes); the
handler then starts ``rsync --server`` itself, with the options the agent's
rsync asked for **checked against a list** (:func:`server_command`): never
``--sender`` (that would let an agent read the receiver's files), no option
that writes outside the destination (backups, temp or log files, keeping
symlinked directories), and the destination replaced by the partition's own
tree, ``<staging>/<volume>.tree``. Its owners, modes, ACLs, extended
attributes, device nodes and hard links need a receiver running as root,
which the handler checks.

Why rsync (docs/architecture.md, "File-level replication"): it is what SMC
runs, its quick check makes a later run send only what changed (plus
deletions), files already complete are not sent again after a crash, and
every kind of entry a root filesystem has survives it. The tree is kept
between runs for that; it is released with the job's staging.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable
from pathlib import Path

from aiohttp import web

from opensmc.receiver.patch import LOG_FORMAT

#: what the build reads (receiver/filesystems.py): rsync's itemized changes, and the mark of an unfinished rsync
CHANGES_SUFFIX = ".changes"
DIRTY_SUFFIX = ".rsync-dirty"

log = logging.getLogger("opensmc.receiver")

__all__ = ["RsyncRefused", "server_command", "tree_path"]

ARGS_HEADER = "X-OpenSMC-Rsync-Args"
#: the ``Upgrade`` token of a raw rsync stream on the request's own connection
UPGRADE = "opensmc-rsync"
TREE_SUFFIX = ".tree"
#: a partition's volume: its disk's volume, ".p", the device id (service/staging.py part_volume_id)
PART_VID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,100}\.p[0-9]+_[0-9]+$")
#: short options rsync's client may pass to a receiving server, and what each means there
_SHORT_OK = set("logDtprHAXSxWcuvdnOJUNIiz")  # no -K (follow symlinked dirs), -b (backups), -R
_CAPS = re.compile(r"^\.?[A-Za-z]*$")  # what follows -e: the client's protocol capabilities
_LONG_OK = {
    "--numeric-ids",
    "--delete",
    "--delete-before",
    "--delete-during",
    "--delete-delay",
    "--delete-after",
    "--delete-excluded",
    "--partial",
    "--force",
    "--ignore-errors",
    "--fuzzy",
    "--inplace",
    "--no-inc-recursive",
    "--ignore-times",
    "--size-only",
    "--preallocate",
    "--log-format=X",  # the client itemizes (-i, --out-format): the server marks what it changed
    "--stats",  # the agent reports how many files a run sent
}
_BWLIMIT = re.compile(r"^--bwlimit=[0-9]{1,12}[kKmM]?$")  # the job's bandwidth_limit, on both ends
_RSYNC_BIN = "rsync"


class RsyncRefused(ValueError):
    """The asked rsync command is not one this receiver runs."""


#: rsync 3.4.0 fixed the path traversals a malicious sender could use on a receiver (CVE-2024-12087, -12088)
MIN_VERSION = (3, 4, 0)


@functools.cache
def rsync_version() -> tuple[int, ...]:
    try:
        out = subprocess.run([_RSYNC_BIN, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return (0,)
    m = re.search(r"version\s+(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0,)


def tree_path(root: Path, vid: str) -> Path:
    return root / f"{vid}{TREE_SUFFIX}"


def server_command(asked: object, tree: Path, changes: Path | None = None) -> list[str]:
    """The ``rsync --server`` command to run for an agent's asked one, or :class:`RsyncRefused`."""
    if not isinstance(asked, list) or not all(isinstance(a, str) for a in asked) or len(asked) > 32:
        raise RsyncRefused("the rsync command must be a short list of strings")
    if len(asked) < 4 or asked[0] != "rsync" or asked[1] != "--server":
        raise RsyncRefused("only 'rsync --server … . DEST' is run here")
    if asked[-2] != ".":
        raise RsyncRefused("the command must end with '. DEST'")
    options = asked[2:-2]
    for opt in options:
        if opt.startswith("--"):
            if opt not in _LONG_OK and not _BWLIMIT.match(opt):
                raise RsyncRefused(f"option {opt!r} is not run on the receiver")
            continue
        if not opt.startswith("-") or len(opt) < 2:
            raise RsyncRefused(f"argument {opt!r} is not run on the receiver")
        letters, e, caps = opt[1:].partition("e")
        if not set(letters) <= _SHORT_OK or (e and not _CAPS.match(caps)):
            raise RsyncRefused(f"option {opt!r} is not run on the receiver")
    # the receiver's own options: what it changed, itemized, for the build to patch the last image
    logged = [f"--log-file={changes}", f"--log-file-format={LOG_FORMAT}"] if changes is not None else []
    return [_RSYNC_BIN, "--server", *logged, *options, ".", str(tree) + "/"]


async def post_rsync(request: web.Request, root: Path) -> web.StreamResponse:
    """Bridge the request's body to ``rsync --server`` and its output to the response."""
    from opensmc.receiver.http import _error  # one error shape for the whole receiver

    vid = request.match_info["vid"]
    if not PART_VID.match(vid):
        return _error(400, "Rsync.NotAPartition", f"{vid!r} is not a partition's volume (…-dN.pD_N)")
    if os.geteuid() != 0:
        return _error(
            501,
            "Rsync.NotRoot",
            "file-level copying needs the receiver to run as root (to keep owners, device nodes and "
            "security attributes); run it as root or copy the partition block by block",
        )
    if shutil.which(_RSYNC_BIN) is None:
        return _error(501, "Rsync.Missing", "rsync is not installed on the receiver host")
    version = rsync_version()
    if version < MIN_VERSION:
        return _error(
            501,
            "Rsync.TooOld",
            f"the receiver host's rsync is {'.'.join(map(str, version))}; file-level copying needs "
            f"{'.'.join(map(str, MIN_VERSION))} or newer (its checks against unsafe paths from a sender)",
        )
    try:
        asked = json.loads(base64.b64decode(request.headers.get(ARGS_HEADER, ""), validate=True))
        tree = tree_path(root, vid)
        changes = root / f"{vid}{CHANGES_SUFFIX}"
        command = server_command(asked, tree, changes)
    except (ValueError, binascii.Error) as exc:
        return _error(400, "Rsync.Refused", f"cannot run the asked rsync command: {exc}")
    tree.mkdir(mode=0o700, exist_ok=True)
    # until this rsync has ended well its change log may miss changes: the next build must not patch
    dirty = root / f"{vid}{DIRTY_SUFFIX}"
    was_dirty = dirty.exists() or _running.get(vid, 0) > 0  # another rsync of this volume: it marks it clean, or not
    dirty.touch()
    _running[vid] = _running.get(vid, 0) + 1
    try:
        if _upgradable(request):
            return await _run_raw(request, vid, tree, command, dirty, was_dirty)
        return await _run(request, vid, tree, command, dirty, was_dirty)
    except BaseException:
        dirty.touch()  # (an overlapping rsync that ended well may have cleared it)
        raise
    finally:
        _running[vid] -= 1
        if not _running[vid]:
            del _running[vid]


#: rsyncs running per volume in this process: one that overlapped another leaves the volume marked dirty
_running: dict[str, int] = {}


def _upgradable(request: web.Request) -> bool:
    """The tunnel asked for the raw stream, and the connection is plain TCP (a TLS socket's bytes
    are not rsync's: those are relayed, decrypted, by :func:`_run`)."""
    asked = request.headers.get("Upgrade", "").strip().lower() == UPGRADE
    transport = request.transport
    return asked and transport is not None and transport.get_extra_info("sslcontext") is None


def _ended(vid: str, tree: Path, code: int, err: bytes, dirty: Path, was_dirty: bool) -> None:
    if code != 0:
        log.warning("volume %s: rsync --server exited %s: %s", vid, code, err.decode("utf-8", "replace")[:500])
        dirty.touch()
    else:
        if not was_dirty and _running.get(vid, 0) == 1:
            dirty.unlink(missing_ok=True)
        log.info("volume %s: rsync into %s done", vid, tree)


async def _run_raw(
    request: web.Request, vid: str, tree: Path, command: list[str], dirty: Path, was_dirty: bool
) -> web.StreamResponse:
    """``101 Switching Protocols``, then the connection's socket is rsync's stdin and stdout."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    # Nothing more of this connection is read here: the tunnel sends no byte before the 101, and
    # every byte after it is rsync's (the body is empty, Content-Length: 0). aiohttp resumes a
    # transport only after pausing it for a queue of pipelined requests, which a tunnel never sends
    # (a client that does mixes its own bytes into its own stream, nobody else's).
    transport.pause_reading()
    from opensmc.receiver.http import PROTOCOL_HEADER, PROTOCOL_VERSION  # (http imports this module)

    # the protocol header goes in before prepare: the middleware's, set after, would not be sent
    headers = {"Upgrade": UPGRADE, "Connection": "Upgrade", PROTOCOL_HEADER: PROTOCOL_VERSION}
    resp = web.StreamResponse(status=101, headers=headers)
    resp.force_close()  # once rsync is done, the connection is closed: it carried no HTTP after the 101
    await resp.prepare(request)  # the status line and headers go out at once (StreamResponse)
    for _ in range(1000):  # they were written whole unless the socket's buffer was full: wait for that
        if not transport.get_write_buffer_size():
            break
        await asyncio.sleep(0.005)
    else:
        raise ConnectionError("the 101 answer could not be sent")
    fd = os.dup(sock.fileno())
    try:
        os.set_blocking(fd, True)  # (the flag is the socket's: the paused transport no longer uses it)
        proc = await asyncio.create_subprocess_exec(
            *_dies_with_us(), *command, stdin=fd, stdout=fd, stderr=asyncio.subprocess.PIPE, cwd=str(tree)
        )
    finally:
        os.close(fd)
    code, err = await _outcome(proc)
    _ended(vid, tree, code, err, dirty, was_dirty)
    return resp


def _dies_with_us() -> list[str]:
    """A prefix that has the kernel stop the raw stream's ``rsync --server`` if this process dies.

    Relayed, it saw its pipes close with us; holding the socket itself, it would go on writing
    into the tree after a kill -9 of the receiver, beside the rsync of the agent's next attempt.
    ``setpriv`` (util-linux) sets its parent-death signal (kept across exec); without it, it is
    not set (``preexec_fn`` is not safe in a process with threads)."""
    return ["setpriv", "--pdeathsig", "TERM", "--"] if _setpriv() else []


@functools.cache
def _setpriv() -> bool:
    return shutil.which("setpriv") is not None


async def _first_of(stream: asyncio.StreamReader, most: int) -> bytes:
    """The first ``most`` bytes of a stream, read to its end (a full pipe would stop its writer)."""
    kept = bytearray()
    while data := await stream.read(64 * 1024):
        kept += data[: max(most - len(kept), 0)]
    return bytes(kept).strip()


async def _outcome(proc: asyncio.subprocess.Process, *work: Awaitable[object]) -> tuple[int, bytes]:
    """rsync's exit code and the start of its stderr, once it and ``work`` are done; an interrupted
    wait (the receiver stopping) kills it."""
    assert proc.stderr is not None
    try:
        err = (await asyncio.gather(_first_of(proc.stderr, 64 * 1024), *work))[0]
        assert isinstance(err, bytes)
        return await proc.wait(), err
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise


async def _run(
    request: web.Request, vid: str, tree: Path, command: list[str], dirty: Path, was_dirty: bool
) -> web.StreamResponse:
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(tree),
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
    resp.enable_chunked_encoding()
    resp.force_close()  # the request body is left unread at the end: the connection cannot be reused
    await resp.prepare(request)
    stdin, stdout = proc.stdin, proc.stdout

    async def pump_in() -> None:
        try:
            async for data in request.content.iter_any():
                stdin.write(data)
                await stdin.drain()
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            stdin.close()

    async def pump_out() -> None:
        while data := await stdout.read(256 * 1024):
            await resp.write(data)

    feeding = asyncio.ensure_future(pump_in())
    try:
        # rsync --server ends when the transfer is done; the agent's side keeps its request body
        # open until it has heard the whole answer, so the end of the process ends the exchange.
        code, err = await _outcome(proc, pump_out())
    finally:
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
    _ended(vid, tree, code, err, dirty, was_dirty)
    await resp.write_eof()
    return resp
