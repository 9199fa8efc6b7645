"""Issue 7 items 2, 10 and 14: body caps before auth, header and idle deadlines, AccessKeys never in clear."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from opensmc.agent.main import _plain_remote
from opensmc.api import agent_routes
from opensmc.api.app import create_app
from opensmc.api.image_routes import routes as image_routes
from opensmc.api.serving import KEEP_ALIVE, MAX_BODY, server_config
from opensmc.images.store import repository_at
from opensmc.receiver.serve import RECEIVER_KEEP_ALIVE, ReceiverThread
from opensmc.service.accounts import new_key_pair
from opensmc.service.context import Caller, Services
from tests.fake_agent import agent_report
from tests.live_server import running

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

FAKE_ACS3 = {
    "authorization": "ACS3-HMAC-SHA256 Credential=LTAIfake,SignedHeaders=host;x-acs-action;x-acs-content-sha256;"
    "x-acs-date;x-acs-signature-nonce;x-acs-version,Signature=00",
    "x-acs-action": "DownloadImage",
    "x-acs-version": "2019-06-01",
}


@pytest.fixture
def endpoint(services: Services) -> Iterator[str]:
    app = create_app(services, [*agent_routes.routes, *image_routes])
    with running(app, header_timeout=0.5) as where:
        yield where


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"x" * size
        sent += size


@pytest.mark.parametrize("path", ["/", "/agent/v1/register", "/opensmc/v1/images", "/no/such/route"])
def test_declared_oversize_body_refused_before_auth(endpoint: str, path: str) -> None:
    with socket.create_connection(("127.0.0.1", int(endpoint.split(":")[1]))) as s:
        method = "GET" if "images" in path else "POST"
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {300 << 20}\r\n\r\n".encode())
        s.sendall(b"x" * 1024)  # nowhere near 300 MiB: the answer must not wait for the body
        s.settimeout(30)
        head = s.recv(65536).decode("latin-1")
    status = int(head.split(" ", 2)[1])
    assert status in (400, 413), head
    assert "arger than" in head  # the message says what to fix


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/", {"content-type": "application/x-www-form-urlencoded"}),
        ("POST", "/agent/v1/register", {}),
        ("GET", "/opensmc/v1/images", FAKE_ACS3),
    ],
)
def test_chunked_oversize_body_cut_off(endpoint: str, method: str, path: str, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=f"http://{endpoint}", timeout=30) as c:
        resp = c.request(method, path, content=_chunks(8 * MAX_BODY), headers=headers)
    assert resp.status_code in (400, 413), resp.text
    assert "larger than" in resp.text


def test_client_disconnect_logs_no_traceback(endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port = int(endpoint.split(":")[1])
    for path in ("/", "/agent/v1/register", "/opensmc/v1/images"):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{'a' * 10}".encode())
        time.sleep(0.3)  # let the handler see the disconnect (not a timing assertion)
    with httpx.Client(base_url=f"http://{endpoint}") as c:
        assert c.get("/agent/v1/info").status_code == 200  # the server is fine
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]


def test_slow_headers_are_disconnected(endpoint: str) -> None:
    port = int(endpoint.split(":")[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        s.settimeout(60)
        assert s.recv(1024) == b""  # closed by the server (the test's deadline is 0.5 s)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(60)
        assert s.recv(1024) == b""  # a connection that never sends anything, too


def test_receiver_drops_slow_headers(tmp_path: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # aiohttp's default keep-alive is an hour, and it is also how long a half-sent request may wait.
    assert RECEIVER_KEEP_ALIVE <= 120
    receiver = ReceiverThread(
        tmp_path / "v", repository_at(tmp_path / "store"), lambda t, v: False, "127.0.0.1", port, keepalive_timeout=0.5
    )
    receiver.start()
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/volumes/v1/frames HTTP/1.1\r\nHost: x\r\n")
            s.settimeout(60)
            assert s.recv(1024) == b""
    finally:
        receiver.stop()


def test_kept_alive_connection_serves_after_idle(endpoint: str) -> None:
    port = int(endpoint.split(":")[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(30)
        for _ in range(2):
            s.sendall(b"GET /agent/v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" in s.recv(65536)
            time.sleep(1.0)  # idle for longer than the header deadline: only an unfinished request is cut


def test_keep_alive_outlives_client_pools() -> None:
    # uvicorn's default of 5 s closed connections the SDK's pool still meant to reuse.
    config = server_config(None, "127.0.0.1", 0)
    assert config.timeout_keep_alive == KEEP_ALIVE > 90  # Go's IdleConnTimeout; requests has none


def _register_body(pair: Any) -> dict[str, Any]:
    report = agent_report("h1", 20, ())
    return {"access_key_id": pair.access_key_id, "access_key_secret": pair.access_key_secret,
            "machine_id": report["machine_id"], "report": report}  # fmt: skip


def _agent_client(services: Services, client: tuple[str, int], base_url: str = "http://testserver") -> TestClient:
    app = Starlette(routes=agent_routes.routes)
    app.state.services = services
    return TestClient(app, client=client, base_url=base_url)


def test_access_key_registration_refused_over_plain_http_from_afar(services: Services, caller: Caller) -> None:
    pair = new_key_pair(services, caller.account_id)
    with _agent_client(services, ("10.1.2.3", 40000)) as c:
        resp = c.post("/agent/v1/register", json=_register_body(pair))
    assert resp.status_code == 403, resp.text
    assert resp.json()["code"] == "InsecureTransport"
    assert "--tls-cert" in resp.json()["message"]
    with _agent_client(services, ("10.1.2.3", 40000), "https://testserver") as c:
        assert c.post("/agent/v1/register", json=_register_body(pair)).status_code == 200
    with _agent_client(services, ("::1", 40000)) as c:
        assert c.post("/agent/v1/register", json=_register_body(pair)).status_code == 200
    services.settings = replace(services.settings, insecure_http=True)
    with _agent_client(services, ("10.1.2.3", 40000)) as c:
        assert c.post("/agent/v1/register", json=_register_body(pair)).status_code == 200


def test_agent_refuses_to_send_access_key_in_clear(tmp_path: Any) -> None:
    assert _plain_remote("http://10.0.0.5:8080")
    assert _plain_remote("http://server.example:8080")
    assert not _plain_remote("https://10.0.0.5:8080")
    assert not _plain_remote("http://127.0.0.1:8080")
    assert not _plain_remote("http://[::1]:8080")
    assert not _plain_remote("http://localhost:8080")
    cmd = [sys.executable, "-m", "opensmc.cli.main", "agent", "run", "--server", "http://192.0.2.1:9",
           "--access-key-id", "LTAIx", "--access-key-secret", "s", "--state-dir", str(tmp_path), "--once"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "in clear" in done.stderr
