"""Signed JSON routes for the web console, for what no SMC action returns: ``/opensmc/v1/console/…``.

* ``GET /opensmc/v1/console/jobs/{job_id}`` (action ``DescribeJobHistory``): the job's events
  (time, event, from, to, detail) and runs with their byte counts;
* ``GET /opensmc/v1/console/progress`` (action ``DescribeJobProgress``): bytes done and to do of
  every running job's open run, for progress in bytes, rate and ETA;
* ``GET /opensmc/v1/console/heartbeats`` (action ``DescribeSourceHeartbeats``): each source's
  last heartbeat time.

Signed like the image routes: ACS3-HMAC-SHA256 over the path, with the action named above
(checked by :func:`opensmc.api.auth.authenticate`, nonce included), an empty body. Another
account's job is 404. Errors are JSON ``{"Code", "Message", "RequestId"}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from opensmc import API_VERSION
from opensmc.api.auth import authenticate
from opensmc.api.signing import SignedRequest
from opensmc.clock import new_request_id
from opensmc.domain.errors import AuthError, InternalError, InvalidParameter, SmcError
from opensmc.service import console
from opensmc.service.context import Caller, Services

log = logging.getLogger("opensmc.api.console")

PREFIX = "/opensmc/v1/console"
#: a GET here has no use for a body; anything bigger is refused before it is read
MAX_BODY = 4096


async def signed_caller(request: Request, action: str) -> Caller:
    headers = {k.lower(): v for k, v in request.headers.items()}
    if not headers.get("authorization", "").startswith("ACS3-"):
        # Only ACS3 signs the path; a V1 signature would not bind the request to one route.
        raise AuthError("MissingAuthorization", f"Sign the request with ACS3-HMAC-SHA256 (action {action}).", 401)
    if headers.get("x-acs-action") != action:
        raise AuthError("InvalidAction.NotFound", f"This route is signed with action {action}.", 404)
    if headers.get("x-acs-version") != API_VERSION:
        raise AuthError("InvalidVersion", f"Specified parameter Version is not valid; use {API_VERSION}.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise InvalidParameter("body", "These routes take no request body.")
    signed = SignedRequest(
        method=request.method,
        path=request.url.path,
        query=parse_qsl(request.url.query, keep_blank_values=True),
        form=[],
        headers=headers,
        body=body,
    )
    services: Services = request.app.state.services
    caller = await run_in_threadpool(authenticate, services, signed)
    request.state.caller = caller  # for the access log (api/ops.py)
    return caller


def _route(action: str, answer: Callable[[Services, Caller, Request], dict[str, Any]]) -> Callable[..., Any]:
    async def endpoint(request: Request) -> Response:
        request_id = new_request_id()
        try:
            caller = await signed_caller(request, action)
            doc = await run_in_threadpool(answer, request.app.state.services, caller, request)
            return JSONResponse({"RequestId": request_id, **doc}, headers={"x-acs-request-id": request_id})
        except SmcError as err:
            body = {"Code": err.code, "Message": err.message, "RequestId": request_id}
            return JSONResponse(body, status_code=err.http_status, headers={"x-acs-request-id": request_id})
        except Exception:
            log.exception("%s failed (RequestId %s)", action, request_id)
            internal = InternalError()
            body = {"Code": internal.code, "Message": internal.message, "RequestId": request_id}
            return JSONResponse(body, status_code=500, headers={"x-acs-request-id": request_id})

    return endpoint


routes: list[Any] = [
    Route(
        PREFIX + "/jobs/{job_id}",
        _route("DescribeJobHistory", lambda s, c, r: console.job_detail(s, c, r.path_params["job_id"])),
        methods=["GET"],
    ),
    Route(
        PREFIX + "/progress",
        _route("DescribeJobProgress", lambda s, c, _r: {"Jobs": console.progress(s, c)}),
        methods=["GET"],
    ),
    Route(
        PREFIX + "/heartbeats",
        _route("DescribeSourceHeartbeats", lambda s, c, _r: {"Sources": console.heartbeats(s, c)}),
        methods=["GET"],
    ),
]
