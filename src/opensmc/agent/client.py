"""An HTTP client for the agent API (docs/agent-api.md), on the standard library's ``http.client``.

Refusals come back as :class:`ApiRefused` with the server's ``code`` and
``message``; 5xx answers as :class:`ServerUnavailable`; network failures as
the ``OSError`` or ``http.client.HTTPException`` the socket raised. The runner decides which ones to retry.

One keep-alive connection per thread (the heartbeat loop and the task channel
each keep theirs); TLS verifies the server's certificate against the system's
trust store or the ``--ca-cert`` bundle. Python 3.6 compatible, standard
library only (docs/agent.md).
"""

import http.client
import json
import ssl
import threading
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlencode, urlsplit

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


class _Connections:
    """Keep-alive ``http.client`` connections to one server, lent to one request at a time.

    Several threads call the API at once (the heartbeat loop, the task
    channel's long-poll, each task's progress reports): each request takes an
    idle connection or opens one, and gives it back when the answer is read;
    at most :data:`MAX_IDLE` idle ones are kept, so threads that come and go
    (one per task) leave no sockets behind.
    """

    MAX_IDLE = 4

    def __init__(self, server_url: str, timeout: float, ssl_context: "Optional[ssl.SSLContext]") -> None:
        url = urlsplit(server_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"server URL must be http(s)://host[:port], got {server_url!r}")
        self.scheme = url.scheme
        self.host = url.hostname
        self.port = url.port
        self.base = url.path.rstrip("/")
        self.timeout = timeout
        self.ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        self._idle: "List[http.client.HTTPConnection]" = []
        self._lock = threading.Lock()

    def _take(self, timeout: float) -> http.client.HTTPConnection:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            if self.scheme == "https":
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.ssl)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def request(
        self, method: str, path: str, body: "Optional[bytes]", headers: "Dict[str, str]", timeout: float
    ) -> "Tuple[int, bytes]":
        """One request; a keep-alive connection the server closed meanwhile is retried once on a new one."""
        for attempt in (0, 1):
            conn = self._take(timeout)
            fresh = conn.sock is None
            try:
                conn.request(method, self.base + path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                if attempt or fresh:
                    raise
                continue
            except BaseException:
                conn.close()
                raise
            if resp.will_close:
                conn.close()
            else:
                self._give_back(conn)
            return resp.status, data
        raise AssertionError("unreachable")


class AgentClient:
    """The agent API. ``http`` replaces the transport (tests: Starlette's ``TestClient``).

    Anything with httpx's ``request(method, url, json=, headers=, params=)``
    returning an object with ``status_code``, ``text`` and ``json()`` will do.
    """

    def __init__(
        self,
        server_url: str,
        *,
        http: Any = None,
        timeout: float = 30.0,
        ssl_context: "Optional[ssl.SSLContext]" = None,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self._own = http is None
        self._http = http
        self._timeout = timeout
        self._conns = _Connections(self.server_url, timeout, ssl_context) if http is None else None

    def close(self) -> None:
        if self._conns is not None:
            self._conns.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def info(self) -> "Dict[str, Any]":
        return self._send("GET", "/info", None, None)

    def register(self, body: "Dict[str, Any]") -> "Dict[str, Any]":
        return self._send("POST", "/register", body, None)

    def heartbeat(self, agent_token: str, body: "Dict[str, Any]") -> "Dict[str, Any]":
        return self._send("POST", "/heartbeat", body, agent_token)

    def tasks(self, agent_token: str, since: str, wait: float) -> "Dict[str, Any]":
        """The task channel: a long-poll that answers when the task view is not `since`, or after `wait` s."""
        params = {"wait": f"{wait:g}", "since": since}
        # The read may take the whole wait: allow it, plus room for a slow answer.
        return self._send("GET", "/tasks", None, agent_token, params=params, timeout=wait + 15.0)

    def task_progress(self, agent_token: str, body: "Dict[str, Any]") -> "Dict[str, Any]":
        return self._send("POST", "/tasks/progress", body, agent_token)

    def task_result(self, agent_token: str, body: "Dict[str, Any]") -> "Dict[str, Any]":
        return self._send("POST", "/tasks/result", body, agent_token)

    def _send(
        self,
        method: str,
        path: str,
        body: "Optional[Dict[str, Any]]",
        token: "Optional[str]",
        *,
        params: "Optional[Dict[str, str]]" = None,
        timeout: "Optional[float]" = None,
    ) -> "Dict[str, Any]":
        headers = {"authorization": f"Bearer {token}"} if token else {}
        if self._conns is None:
            resp = self._http.request(
                method, f"{self.server_url}{PREFIX}{path}", json=body, headers=headers, params=params
            )
            status, text = int(resp.status_code), str(resp.text)
        else:
            headers["user-agent"] = f"opensmc-agent/{__version__}"
            headers["accept"] = "application/json"
            raw = None
            if body is not None:
                raw = json.dumps(body).encode("utf-8")
                headers["content-type"] = "application/json"
            query = f"?{urlencode(params)}" if params else ""
            status, data = self._conns.request(
                method, f"{PREFIX}{path}{query}", raw, headers, timeout if timeout is not None else self._timeout
            )
            text = data.decode("utf-8", "replace")
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if status >= 500 or not isinstance(doc, dict):
            raise ServerUnavailable(f"{method} {path}: HTTP {status} {text[:200]!r}", status)
        if status >= 400:
            raise ApiRefused(status, str(doc.get("code", "Error")), str(doc.get("message", text[:200])))
        return doc
