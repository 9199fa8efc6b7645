"""How the API port is served: body caps before any handler, header and idle deadlines.

Every route of the API port (SMC RPC, agent API, image routes, and paths
that match no route) goes through :class:`BodyLimit`, so an unauthenticated
client cannot make the server hold a large body: a declared
``Content-Length`` over the cap is answered at once, and a chunked body is
cut off as soon as it passes the cap. Handlers never see more than
:data:`MAX_BODY` bytes.

:class:`DeadlineHttpToolsProtocol` is uvicorn's httptools protocol (the C
parser of Node's llhttp) with a header deadline: a connection must complete
its request line and headers within ``header_timeout`` seconds of opening,
or of the first byte after its last response; a slow-header client is
disconnected instead of holding a socket forever. It replaced uvicorn's
pure-Python h11 protocol, which cost about 50 µs more per request (a bare
endpoint: ~10,000 against ~24,000 requests/s; docs/performance.md);
:class:`DeadlineH11Protocol` stays for a Python without httptools.

Idle keep-alive connections are closed after :data:`KEEP_ALIVE` seconds:
longer than the idle timeout of the clients' pools (Go's
``IdleConnTimeout`` is 90 s; ``requests``, under both Python SDKs, has none
and checks a pooled connection before reuse), so a client closes an idle
connection before we do, and a request never races our close (uvicorn's
default of 5 s reset the official SDK's connection after exactly 5 s idle).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard] on every platform we build for
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

from opensmc.api.render import error_body, render
from opensmc.clock import new_request_id
from opensmc.domain.errors import SmcError

#: The largest request body any route of the API port takes (RPC forms, agent reports).
MAX_BODY = 1 << 20
#: Seconds a connection may take to send its request line and headers.
HEADER_TIMEOUT = 15.0
#: Seconds an idle keep-alive connection is kept open (see the module docstring).
KEEP_ALIVE = 120

AGENT_PREFIX = "/agent/v1"
IMAGE_PREFIX = "/opensmc/v1/images"


def too_large(path: str, limit: int) -> tuple[int, bytes, str, str]:
    """(status, body, content type, request id) refusing an over-large body, shaped like the route family's errors."""
    message = f"The request body is larger than {limit} bytes; send at most {limit}."
    request_id = new_request_id()
    if path.startswith(AGENT_PREFIX):
        body = json.dumps({"code": "BodyTooLarge", "message": message}).encode()
        return 413, body, "application/json", request_id
    if path.startswith(IMAGE_PREFIX):
        body = json.dumps({"Code": "BodyTooLarge", "Message": message, "RequestId": request_id}).encode()
        return 413, body, "application/json", request_id
    # The SMC RPC endpoint: the error body every SMC client parses (400, like other bad input).
    err = SmcError(message, code="InvalidParameter", http_status=400)
    data, ctype = render(error_body(err, request_id), "Error", "JSON")
    return 400, data, ctype, request_id


class BodyLimit:
    """Pure ASGI middleware: refuse request bodies over ``limit`` bytes before any handler reads them."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        if declared is not None and declared > self.limit:
            await self._refuse(scope, send)
            return
        received = 0
        overflow = False
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, overflow
            if overflow:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # The handler sees a disconnect and stops reading; we answer instead.
                    overflow = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if overflow and not started:
                return  # the handler's answer to a body it never got whole is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, guarded_receive, guarded_send)
        if overflow and not started:
            await self._refuse(scope, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        status, body, ctype, request_id = too_large(str(scope.get("path", "")), self.limit)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                # close: the rest of the body is not read, so the connection cannot be reused
                "headers": [
                    (b"content-type", ctype.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    (b"x-acs-request-id", request_id.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            # A malformed length is h11's to refuse; a huge one is ours.
            return int(text) if text.isascii() and text.isdigit() and len(text) < 20 else None
    return None


class _HeaderDeadline(asyncio.Protocol):
    """The header deadline, for either of uvicorn's HTTP/1.1 protocols (mixed in before it)."""

    header_timeout: float = HEADER_TIMEOUT
    # provided by the uvicorn protocol this is mixed into
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self._between_requests():
            self._arm_header_deadline()  # the first byte of a next request on a kept-alive connection
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:
            self._cancel_header_deadline()  # the headers are in: a new request cycle began

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or bool(self.cycle.response_complete)

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_timeout_expired(self) -> None:
        self._header_deadline = None
        if self._between_requests() and not self.transport.is_closing():
            self.transport.close()


class DeadlineH11Protocol(_HeaderDeadline, H11Protocol):
    """uvicorn's h11 protocol, closing a connection that does not finish its headers in time."""


class _OneWrite:
    """A response's transport that holds its status line and headers until its first body part.

    uvicorn writes the head and the body of a response in two ``write`` calls:
    two system calls, and two wake-ups of the client, per small answer. Held
    back, the head goes out with the first body part in one (a 100 Continue
    and anything else pass at once; closing sends what is held first).
    """

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held = b""

    def write(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        elif data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 1"):
            self._held = data  # a final response's head: its body follows
            return
        self._transport.write(data)

    def close(self) -> None:
        if self._held:
            self._transport.write(self._held)
            self._held = b""
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


if HttpToolsProtocol is not None:

    class DeadlineHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
        """uvicorn's httptools protocol, closing a connection that does not finish its headers in time.

        Each response goes out in one write (:class:`_OneWrite`).
        """

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = getattr(self, "cycle", None)
            # Not for HEAD: uvicorn writes no body part for it, so a held head would never go out.
            if cycle is not None and cycle.scope["method"] != "HEAD" and not isinstance(cycle.transport, _OneWrite):
                cycle.transport = _OneWrite(cycle.transport)

    _PROTOCOL: type[_HeaderDeadline] = DeadlineHttpToolsProtocol
else:  # pragma: no cover
    _PROTOCOL = DeadlineH11Protocol


def with_header_timeout(seconds: float, base: type[_HeaderDeadline] | None = None) -> type[_HeaderDeadline]:
    """The API port's protocol class with another header deadline (tests use a short one)."""
    base = base or _PROTOCOL
    return type(base.__name__, (base,), {"header_timeout": seconds})


def server_config(
    app: Any, host: str, port: int, *, header_timeout: float = HEADER_TIMEOUT, **kw: Any
) -> uvicorn.Config:
    """The uvicorn configuration of the API port (also used by the tests' live servers)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=with_header_timeout(header_timeout),
        timeout_keep_alive=KEEP_ALIVE,
        log_level="warning",
        access_log=False,
        **kw,
    )
