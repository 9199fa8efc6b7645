"""The agent API (docs/agent-api.md): JSON over HTTP under ``/agent/v1/``.

``routes`` is mounted into the server's Starlette app next to the SMC RPC
endpoint; handlers read ``request.app.state.services``. Every failure is
``{"code", "message"}`` with a 4xx/5xx status, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from opensmc import __version__
from opensmc.api import agent_dist
from opensmc.api.task_poll import TaskPoll
from opensmc.domain import strictjson
from opensmc.domain.errors import InvalidParameter, SmcError
from opensmc.service import agents, wakeup
from opensmc.service.context import Services, is_loopback

log = logging.getLogger("opensmc.agent_api")

PREFIX = "/agent/v1"
API_VERSION = 1
MAX_BODY = 1 << 20
#: the longest ``wait`` a task long-poll may ask for (seconds); the default when it asks none
MAX_WAIT = 60.0
DEFAULT_WAIT = 25.0
#: how often the open long-polls' sources are re-read (one query for all, api/task_poll.py): the bound on
#: how late one sees a change made by another server process (this one's wake it at once, service/wakeup.py)
POLL_EVERY = 0.25


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


async def _body(request: Request) -> Mapping[str, Any]:
    # The server's BodyLimit middleware refuses larger bodies first; this holds for apps without it.
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise SmcError("The request body is larger than 1 MiB.", code="BodyTooLarge", http_status=413)
        parts.append(chunk)
    raw = b"".join(parts)
    if not raw:
        return {}
    try:
        body = strictjson.loads(raw)
    except strictjson.NotJson:
        raise SmcError("The request body is not valid JSON.", code="InvalidJson", http_status=400) from None
    except strictjson.StrictJsonError as exc:
        # NaN would be stored and then break every answer that echoes it (a 500);
        # deep nesting would recurse. Both are refused here, before any use.
        raise InvalidParameter("body", f"The JSON body is refused: {exc}") from None
    if not isinstance(body, dict):
        raise SmcError("The request body must be a JSON object.", code="InvalidJson", http_status=400)
    if "\\u0000" in json.dumps(body):
        # PostgreSQL text cannot hold NUL; no field of the agent API has a use for it.
        raise SmcError("The request body contains a NUL character.", code="InvalidJson", http_status=400)
    return body


async def _call(request: Request, work: Callable[[Services, Mapping[str, Any]], dict[str, Any]]) -> Response:
    services: Services = request.app.state.services
    try:
        body = await _body(request)
        result = await run_in_threadpool(work, services, body)
        return JSONResponse(result)
    except SmcError as err:
        if err.http_status >= 500:
            log.error("agent API %s failed: %s", request.url.path, err.message)
        return _error(err.http_status, err.code, err.message)
    except ClientDisconnect:
        log.info("agent API %s: the client disconnected before sending its whole request", request.url.path)
        return _error(400, "ClientDisconnect", "The request body ended early.")
    except Exception:
        log.exception("agent API %s: internal error", request.url.path)
        return _error(500, "InternalError", "The server failed to handle the request; see its log.")


async def register(request: Request) -> Response:
    # An AccessKey secret sent over plain HTTP from another host has crossed a network in clear.
    client = request.client.host if request.client else ""
    plain_remote = request.url.scheme == "http" and not is_loopback(client)

    def work(svc: Services, body: Mapping[str, Any]) -> dict[str, Any]:
        reg = agents.register(svc, body, plain_http_remote=plain_remote)
        log.info(
            "agent registered: source %s (%s) in account %s",
            reg.source_id,
            "new" if reg.created else "known machine",
            reg.account_id,
        )
        return {
            "source_id": reg.source_id,
            "agent_token": reg.agent_token,
            "created": reg.created,
            "heartbeat_rate": svc.settings.heartbeat_rate,
        }

    return await _call(request, work)


async def heartbeat(request: Request) -> Response:
    authorization = request.headers.get("authorization")

    def work(svc: Services, body: Mapping[str, Any]) -> dict[str, Any]:
        return agents.heartbeat(svc, authorization, body)

    return await _call(request, work)


async def task_progress(request: Request) -> Response:
    authorization = request.headers.get("authorization")

    def work(svc: Services, body: Mapping[str, Any]) -> dict[str, Any]:
        return agents.task_progress(svc, authorization, body)

    return await _call(request, work)


async def task_result(request: Request) -> Response:
    authorization = request.headers.get("authorization")

    def work(svc: Services, body: Mapping[str, Any]) -> dict[str, Any]:
        return agents.task_result(svc, authorization, body)

    return await _call(request, work)


def _wait_param(request: Request) -> tuple[float, str]:
    raw = request.query_params.get("wait", "")
    try:
        wait = float(raw) if raw else DEFAULT_WAIT
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT:  # also refuses nan
        raise SmcError(
            f"wait must be a number of seconds from 0 to {MAX_WAIT:g}, got {raw!r}.",
            code="InvalidParameter",
            http_status=400,
        )
    since = request.query_params.get("since", "")
    if len(since) > 64:
        raise SmcError(
            "since must be a version from an earlier answer (at most 64 characters).",
            code="InvalidParameter",
            http_status=400,
        )
    return wait, since


async def tasks(request: Request) -> Response:
    """The agent's task channel: a long-poll that answers once the task view is not ``since``.

    Answers at once when the version differs from ``since`` (or none is
    given), else when the view changes, else after ``wait`` seconds with the
    same view. While it waits it holds neither a database connection nor a
    worker thread: it sleeps on an in-process wake-up (a job transition of
    this process: it then reads its own view again) and on the shared re-read
    of every open long-poll's source every :data:`POLL_EVERY` seconds (a
    change made by another process, ``api/task_poll.py``).
    """
    services: Services = request.app.state.services
    authorization = request.headers.get("authorization")
    loop = asyncio.get_running_loop()
    try:
        wait, since = _wait_param(request)
        who = await run_in_threadpool(agents.authenticate, services, authorization)
        deadline = loop.time() + wait
        poll: TaskPoll | None = getattr(request.app.state, "task_poll", None)
        if poll is None:
            poll = request.app.state.task_poll = TaskPoll(services, lambda: POLL_EVERY)
        with wakeup.waiter() as changed, poll.watch(who.source_id, since) as other_process:
            while True:
                changed.clear()  # before the read: a transition during it wakes the next wait
                version = await run_in_threadpool(agents.task_view_version, services, who.source_id)
                while version == since and not changed.is_set():
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    if await request.is_disconnected():  # the agent went away (restarted): stop polling for it
                        return Response(status_code=204)
                    if other_process.moved.is_set():  # the shared read saw another version
                        version = other_process.version
                        break
                    # Woken by this process's transitions at once, by the shared read (another process's)
                    # within POLL_EVERY; the timeout is only for noticing a disconnected agent.
                    await _first(changed, other_process.moved, timeout=min(POLL_EVERY, left))
                if version != since or deadline - loop.time() <= 0:
                    break
        view = await run_in_threadpool(agents.task_view, services, who.source_id)
        return JSONResponse(view)
    except SmcError as err:
        if err.http_status >= 500:
            log.error("agent API %s failed: %s", request.url.path, err.message)
        return _error(err.http_status, err.code, err.message)
    except Exception:
        log.exception("agent API %s: internal error", request.url.path)
        return _error(500, "InternalError", "The server failed to handle the request; see its log.")


async def _first(a: asyncio.Event, b: asyncio.Event, timeout: float) -> None:
    """Until either event is set, or ``timeout`` seconds."""
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def info(request: Request) -> Response:
    """Unauthenticated: lets an agent check it reached an OpenSMC server speaking its API version."""
    return JSONResponse({"service": "opensmc", "api_version": API_VERSION, "server_version": __version__})


routes: list[Route] = [
    Route(f"{PREFIX}/info", info, methods=["GET"]),
    Route(f"{PREFIX}/register", register, methods=["POST"]),
    Route(f"{PREFIX}/heartbeat", heartbeat, methods=["POST"]),
    Route(f"{PREFIX}/tasks", tasks, methods=["GET"]),
    Route(f"{PREFIX}/tasks/progress", task_progress, methods=["POST"]),
    Route(f"{PREFIX}/tasks/result", task_result, methods=["POST"]),
    # the agent itself: GET /agent/opensmc-agent.pyz, its .sha256 and /agent/install.sh
    *agent_dist.routes,
]
