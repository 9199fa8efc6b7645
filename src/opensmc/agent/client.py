"""An HTTP client for the agent API (docs/agent-api.md), on httpx.

Refusals come back as :class:`ApiRefused` with the server's ``code`` and
``message``; 5xx answers as :class:`ServerUnavailable`; network failures as
httpx's own ``httpx.TransportError``. The runner decides which ones to retry.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from opensmc import __version__

PREFIX = "/agent/v1"


class ApiRefused(Exception):
    """The server answered 4xx: the request will not succeed as it is."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code} ({status}): {message}")
        self.status = status
        self.code = code
        self.message = message


class ServerUnavailable(Exception):
    """The server answered 5xx (or something that is not the agent API): worth retrying later."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status  #: the HTTP status, 0 when no answer came


class AgentClient:
    def __init__(
        self,
        server_url: str,
        *,
        http: httpx.Client | None = None,
        timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self._own = http is None
        self._http = http or httpx.Client(
            timeout=timeout,
            headers={"user-agent": f"opensmc-agent/{__version__}"},
            verify=ssl_context if ssl_context is not None else True,
        )

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        return self._send("GET", "/info", None, None)

    def register(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._send("POST", "/register", body, None)

    def heartbeat(self, agent_token: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._send("POST", "/heartbeat", body, agent_token)

    def tasks(self, agent_token: str, since: str, wait: float) -> dict[str, Any]:
        """The task channel: a long-poll that answers when the task view is not `since`, or after `wait` s."""
        params = {"wait": f"{wait:g}", "since": since}
        # The read may take the whole wait: allow it, plus room for a slow answer. A client
        # passed in (tests: Starlette's TestClient, which refuses per-request timeouts) keeps its own.
        timeout = httpx.Timeout(10.0, read=wait + 15.0) if self._own else None
        return self._send("GET", "/tasks", None, agent_token, params=params, timeout=timeout)

    def task_progress(self, agent_token: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._send("POST", "/tasks/progress", body, agent_token)

    def task_result(self, agent_token: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._send("POST", "/tasks/result", body, agent_token)

    def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        token: str | None,
        *,
        params: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        extra: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        resp = self._http.request(
            method, f"{self.server_url}{PREFIX}{path}", json=body, headers=headers, params=params, **extra
        )
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 500 or not isinstance(data, dict):
            raise ServerUnavailable(f"{method} {path}: HTTP {resp.status_code} {resp.text[:200]!r}", resp.status_code)
        if resp.status_code >= 400:
            raise ApiRefused(
                resp.status_code, str(data.get("code", "Error")), str(data.get("message", resp.text[:200]))
            )
        return data
