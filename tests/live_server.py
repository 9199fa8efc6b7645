"""Run an ASGI app under uvicorn on 127.0.0.1 (a free port) in a background thread.

For tests that want real HTTP over a real socket (the official SDKs, raw
httpx), without Starlette's TestClient.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from opensmc.api.serving import HEADER_TIMEOUT, server_config


class _ThreadedServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the main thread belongs to pytest
        pass


@contextmanager
def running(app: Any, *, header_timeout: float = HEADER_TIMEOUT) -> Iterator[str]:
    """Serve `app` until the block ends, configured like `opensmc server`; yields `host:port`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _ThreadedServer(server_config(app, "127.0.0.1", port, header_timeout=header_timeout, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            sock.close()
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
