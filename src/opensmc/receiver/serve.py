"""Running the receiver's aiohttp app next to the API, on a thread with its own event loop.

The receiver listens on a port of its own (``--receiver-listen``) because
bulk frame bodies go faster through aiohttp on the stock asyncio loop than
through the API's uvicorn stack (PERF_FLOORS.md).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from opensmc.chunkstore.repository import Repository
from opensmc.receiver.http import Authorize, make_app
from opensmc.receiver.space import OnFull, SpaceGuard

#: Idle keep-alive (and header) deadline of the receiver's connections, in seconds:
#: longer than agents' pools keep an idle connection, short enough to shed stuck clients.
RECEIVER_KEEP_ALIVE = 120.0


class _BadRequestsWithoutTraceback(logging.Filter):
    """aiohttp logs a malformed request (bad header bytes, an oversized line) at ERROR with a
    traceback, although it answers it 400 itself. That is a client's fault, not ours: keep one
    INFO line, so the log's tracebacks stay the server's faults."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and (exc.code or 400) < 500:
            record.msg, record.args = "bad request refused (%s): %s", (exc.code, exc.message.strip())
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_AIOHTTP_SERVER_LOG = logging.getLogger("aiohttp.server")
if not any(isinstance(f, _BadRequestsWithoutTraceback) for f in _AIOHTTP_SERVER_LOG.filters):
    _AIOHTTP_SERVER_LOG.addFilter(_BadRequestsWithoutTraceback())


class ReceiverThread:
    def __init__(
        self,
        volumes_root: Path,
        repo: Repository,
        authorize: Authorize,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_timeout: float = RECEIVER_KEEP_ALIVE,
        space: SpaceGuard | None = None,
        on_full: OnFull | None = None,
    ) -> None:
        self.space = space
        self.on_full = on_full
        self.ssl_context = ssl_context
        self.keepalive_timeout = keepalive_timeout
        self.volumes_root = volumes_root
        self.repo = repo
        self.authorize = authorize
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, name="opensmc-receiver", daemon=True)

    def start(self, timeout: float = 15.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the receiver did not start in time")
        if self._error is not None:
            raise RuntimeError(f"the receiver could not listen on {self.host}:{self.port}: {self._error}")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._cleanup())
        self._loop.close()

    async def _start(self) -> None:
        self.volumes_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # client_max_size bounds one request body: agents send batches of frames of ~8 MiB.
        app = make_app(self.volumes_root, self.repo, self.authorize, space=self.space, on_full=self.on_full)
        # keepalive_timeout also bounds a connection that never finishes its headers
        # (aiohttp closes it if no request arrived by then); aiohttp's default is an hour.
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.keepalive_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
