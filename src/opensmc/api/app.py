"""The SMC OpenAPI endpoint: `GET`/`POST /`, signed RPC calls (WIRE.md §6).

Per request: read parameters from the query and a form body, find Action and
Version (query, form or `x-acs-*` headers), verify the signature and the
nonce, dispatch through the action registry on a worker thread (the store is
synchronous), and render JSON or XML. Every failure becomes an SMC error
body; an unexpected one is logged with its RequestId and answered with 500
InternalError, never a traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from opensmc import API_VERSION
from opensmc.api.actions import ACTIONS
from opensmc.api.auth import authenticate_then
from opensmc.api.nonces import NonceBatcher
from opensmc.api.render import error_body, render
from opensmc.api.serving import MAX_BODY, BodyLimit, content_length, too_large
from opensmc.api.signing import V1_METHOD, SignedRequest, collect_headers
from opensmc.clock import new_request_id
from opensmc.domain.errors import AuthError, InternalError, InvalidParameter, MissingParameter, SmcError
from opensmc.params import Params
from opensmc.service.accounts import check_policy
from opensmc.service.context import Caller, Services

log = logging.getLogger("opensmc.api")

#: parameters that belong to the protocol, not to any action
COMMON = frozenset(
    {
        "Action",
        "Version",
        "Format",
        "Timestamp",
        "SignatureMethod",
        "SignatureVersion",
        "SignatureNonce",
        "SignatureType",
        "AccessKeyId",
        "Signature",
        "SecurityToken",
        "OwnerId",
        "ResourceOwnerAccount",
        "ResourceOwnerId",
        "OwnerAccount",
    }
)


class RpcEndpoint:
    """The SMC RPC endpoint as a plain ASGI app: ``GET`` and ``POST /``.

    :class:`ApiApp` sends these requests here directly, past Starlette's
    middleware stack, router, ``Request`` and ``Response`` objects: for a
    call that does a millisecond of work they cost a quarter of it (py-spy,
    docs/performance.md). What that stack did for this route is done here:
    the body cap of :class:`~opensmc.api.serving.BodyLimit` (same answer),
    the access log and metrics (``api/ops.py``, through :attr:`record`), and
    no exception escapes.
    """

    def __init__(self, services: Services, nonces: NonceBatcher) -> None:
        self.services = services
        self.nonces = nonces
        #: the access log and metrics of each call (``ops.ApiCalls.record``, set by ``create_app``)
        self.record: Callable[[str, Caller | None, str, int, str, float], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = new_request_id()
        note = _Note()
        status = 500
        try:
            try:
                body = await _read_body(scope, receive)
            except _TooLarge:
                status, data, ctype, request_id = too_large("/", MAX_BODY)
                note.error_code = "InvalidParameter"
                # close: the rest of the body is not read, so the connection cannot be reused
                await _respond(send, status, data, ctype, request_id, close=True)
                return
            except ClientDisconnect:
                # The client went away mid-body: nobody reads an answer, and it is not a
                # server fault worth a traceback.
                log.info("client disconnected before sending its whole request (RequestId %s)", request_id)
                status = 400
                await _respond(send, status, b"", None, None)
                return
            status, data, ctype = await self._answer(scope, body, request_id, note)
            await _respond(send, status, data, ctype, request_id)
        finally:
            if self.record is not None:
                seconds = time.perf_counter() - started
                self.record(note.action, note.caller, note.error_code, status, request_id, seconds)

    async def _answer(self, scope: Scope, body: bytes, request_id: str, note: _Note) -> tuple[int, bytes, str]:
        services = self.services
        fmt = "JSON"
        action_name = "Error"
        try:
            # Straight from the ASGI scope: no URL or Headers object per request.
            query = parse_query(scope.get("query_string", b"").decode())
            headers, repeated = collect_headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"])
            form: list[tuple[str, str]] = []
            if body and headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                form = parse_query(body.decode("utf-8", errors="replace"))
            values: dict[str, str] = {}
            for key, value in (*query, *form):
                values[key] = value
            fmt = values.get("Format", "JSON") or "JSON"
            param_action, header_action = _one(query, form, "Action"), headers.get("x-acs-action")
            param_version, header_version = _one(query, form, "Version"), headers.get("x-acs-version")
            for name, a, b in (("Action", param_action, header_action), ("Version", param_version, header_version)):
                if a is not None and b is not None and a != b:
                    raise InvalidParameter(name, f"The parameter and the x-acs-{name.lower()} header differ; send one.")
            action_name = param_action or header_action or ""
            version = param_version or header_version or ""
            if not action_name:
                raise MissingParameter("Action")
            action = ACTIONS.get(action_name)
            if action is None:
                raise AuthError(
                    "InvalidAction.NotFound",
                    "Specified api is not found, please check your url and method.",
                    404,
                )
            if not version:
                raise MissingParameter("Version")
            if version != API_VERSION:
                raise AuthError("InvalidVersion", "Specified parameter Version is not valid.")
            signed = SignedRequest(
                method=scope["method"],
                path=scope["path"],  # "/": the only path this endpoint serves
                query=query,
                form=form,
                headers=headers,
                body=body,
                repeated=repeated,
            )

            def authorized_call(caller: Caller) -> dict[str, Any]:
                # On the worker thread that runs the handler: with a cached key, the request's
                # one thread hop (api/auth.py; the nonce may have been recorded on it too).
                note.caller = caller  # for the access log (api/ops.py)
                check_policy(caller, action_name)
                if caller.scheme == V1_METHOD:
                    # A V1 signature covers the query and form only: an Action or Version
                    # that came from a header was not signed, so it cannot choose what runs.
                    if param_action is None:
                        raise MissingParameter("Action")
                    if param_version is None:
                        raise MissingParameter("Version")
                for key, value in values.items():
                    # PostgreSQL text cannot hold NUL, and no SMC parameter has a use for it.
                    if "\x00" in key or "\x00" in value:
                        raise InvalidParameter(key.replace("\x00", ""), "It contains a NUL character.")
                params = Params({k: v for k, v in values.items() if k not in COMMON})
                return action.handler(services, caller, params)

            _caller, result = await authenticate_then(
                services, signed, self.nonces, authorized_call, read_only=action.read_only
            )
            payload: dict[str, Any] = {"RequestId": request_id, **result}
            data, ctype = render(payload, f"{action_name}Response", fmt)
            return 200, data, ctype
        except SmcError as err:
            note.error_code = err.code  # for the access log (api/ops.py)
            return _error(err, request_id, fmt)
        except Exception:
            log.exception("internal error in %s (RequestId %s)", action_name, request_id)
            note.error_code = InternalError().code
            return _error(InternalError(), request_id, fmt)
        finally:
            note.action = action_name  # for the access log (api/ops.py)


@dataclass(slots=True)
class _Note:
    """What the access log says of a call."""

    action: str = ""
    caller: Caller | None = None
    error_code: str = ""


class _TooLarge(Exception):
    """The request body is over :data:`MAX_BODY`."""


def parse_query(text: str) -> list[tuple[str, str]]:
    """``parse_qsl(text, keep_blank_values=True)``, with less work for the fields that need no decoding.

    Most fields of a signed request are plain ``name=value``; parse_qsl
    unquotes every name and value, a visible share of a small call's CPU.
    """
    out: list[tuple[str, str]] = []
    for field in text.split("&"):
        if not field:
            continue
        name, _eq, value = field.partition("=")
        if "%" in field or "+" in field:
            name = unquote(name.replace("+", " "))
            value = unquote(value.replace("+", " "))
        out.append((name, value))
    return out


def _one(query: list[tuple[str, str]], form: list[tuple[str, str]], name: str) -> str | None:
    """The single value of a protocol parameter in query and form; two values are refused."""
    found = {v for k, v in (*query, *form) if k == name}
    if len(found) > 1:
        raise InvalidParameter(name, "The parameter is given more than once with different values.")
    return found.pop() if found else None


async def _read_body(scope: Scope, receive: Receive) -> bytes:
    """The whole body, refused past :data:`MAX_BODY` as :class:`~opensmc.api.serving.BodyLimit` refuses it."""
    declared = content_length(scope)
    if declared is not None and declared > MAX_BODY:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(
    send: Send, status: int, data: bytes, ctype: str | None, request_id: str | None, *, close: bool = False
) -> None:
    headers = [(b"content-length", str(len(data)).encode())]
    if ctype is not None:
        headers.append((b"content-type", ctype.encode()))
    if request_id is not None:
        headers.append((b"x-acs-request-id", request_id.encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _error(err: SmcError, request_id: str, fmt: str) -> tuple[int, bytes, str]:
    data, ctype = render(error_body(err, request_id), "Error", fmt)
    # Tea parses XML errors only under exactly this content type (WIRE.md §5.1).
    return err.http_status, data, ctype


class ApiApp(Starlette):
    """The API port's app: SMC calls go straight to :class:`RpcEndpoint`, the rest through Starlette.

    Everything but ``GET``/``POST /`` (the agent API, image routes, console,
    ops routes, and any other method on ``/``) takes Starlette's middleware
    and router as before.
    """

    rpc: RpcEndpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] in _RPC_METHODS:
            await self.rpc(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


_RPC_METHODS = frozenset({"GET", "POST"})


def create_app(services: Services, extra_routes: Sequence[BaseRoute] = ()) -> ApiApp:
    nonces = NonceBatcher(services)  # the nonce transactions of concurrent requests (api/nonces.py)
    rpc = RpcEndpoint(services, nonces)
    app = ApiApp(
        # The route is for what ApiApp does not send to the endpoint itself (HEAD /, and 405s).
        routes=[Route("/", rpc, methods=["GET", "POST"]), *extra_routes],
        # Outermost: no route, matched or not, reads more than MAX_BODY before we refuse it.
        middleware=[Middleware(BodyLimit, limit=MAX_BODY)],
    )
    app.rpc = rpc
    app.state.services = services
    app.state.nonces = nonces
    # --- operations: /metrics, /healthz, /readyz and the access log (api/ops.py) ---
    from opensmc.api import ops

    rpc.record = ops.install(app, services).record
    return app
