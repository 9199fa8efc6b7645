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
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from opensmc import API_VERSION
from opensmc.api.actions import ACTIONS
from opensmc.api.auth import authenticate_then
from opensmc.api.nonces import NonceBatcher
from opensmc.api.render import error_body, render
from opensmc.api.serving import MAX_BODY, BodyLimit
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


async def handle_rpc(request: Request) -> Response:
    services: Services = request.app.state.services
    request_id = new_request_id()
    fmt = "JSON"
    action_name = "Error"
    try:
        # From the scope, as request.url would give them, without building a URL per request.
        raw_query = request.scope.get("query_string", b"").decode()
        query = parse_qsl(raw_query, keep_blank_values=True)
        headers, repeated = collect_headers(request.headers.items())
        body = await _read_body(request)
        form: list[tuple[str, str]] = []
        if body and headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            form = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
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
            method=request.method,
            path=request.scope["path"],  # "/": the only path this route matches
            query=query,
            form=form,
            headers=headers,
            body=body,
            repeated=repeated,
        )

        def authorized_call(caller: Caller) -> dict[str, Any]:
            # On the worker thread that runs the handler: with a cached key, the request's
            # one thread hop (api/auth.py; the nonce may have been recorded on it too).
            request.state.caller = caller  # for the access log (api/ops.py)
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

        _caller, result = await authenticate_then(services, signed, request.app.state.nonces, authorized_call)
        payload: dict[str, Any] = {"RequestId": request_id, **result}
        data, ctype = render(payload, f"{action_name}Response", fmt)
        return Response(data, 200, headers={"x-acs-request-id": request_id}, media_type=ctype)
    except SmcError as err:
        request.state.error_code = err.code  # for the access log (api/ops.py)
        return _error(err, request_id, fmt)
    except ClientDisconnect:
        # The client went away mid-body (or the body cap cut it off): nobody reads an
        # answer, and it is not a server fault worth a traceback.
        log.info("client disconnected before sending its whole request (RequestId %s)", request_id)
        return Response(status_code=400)
    except Exception:
        log.exception("internal error in %s (RequestId %s)", action_name, request_id)
        request.state.error_code = InternalError().code
        return _error(InternalError(), request_id, fmt)
    finally:
        request.state.action = action_name  # for the access log (api/ops.py)


def _one(query: list[tuple[str, str]], form: list[tuple[str, str]], name: str) -> str | None:
    """The single value of a protocol parameter in query and form; two values are refused."""
    found = {v for k, v in (*query, *form) if k == name}
    if len(found) > 1:
        raise InvalidParameter(name, "The parameter is given more than once with different values.")
    return found.pop() if found else None


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        raise SmcError("The request body is too large.", code="InvalidParameter", http_status=400)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise SmcError("The request body is too large.", code="InvalidParameter", http_status=400)
        chunks.append(chunk)
    return b"".join(chunks)


def _error(err: SmcError, request_id: str, fmt: str) -> Response:
    data, ctype = render(error_body(err, request_id), "Error", fmt)
    # Tea parses XML errors only under exactly this content type (WIRE.md §5.1).
    return Response(data, err.http_status, headers={"x-acs-request-id": request_id}, media_type=ctype)


def create_app(services: Services, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    app = Starlette(
        routes=[Route("/", handle_rpc, methods=["GET", "POST"]), *extra_routes],
        # Outermost: no route, matched or not, reads more than MAX_BODY before we refuse it.
        middleware=[Middleware(BodyLimit, limit=MAX_BODY)],
    )
    app.state.services = services
    app.state.nonces = NonceBatcher(services)  # the nonce transactions of concurrent requests (api/nonces.py)
    # --- operations: /metrics, /healthz, /readyz and the access log (api/ops.py) ---
    from opensmc.api import ops

    ops.install(app, services)
    return app
