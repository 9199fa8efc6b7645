"""Real `opensmc` processes on real sockets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

OPENSMC = [sys.executable, "-m", "opensmc.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    endpoint: str
    data_dir: Path
    log: Path

    @property
    def credentials(self) -> dict[str, str]:
        return dict(json.loads((self.data_dir / "admin-credentials.json").read_text()))

    def call(self, action: str, *params: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*OPENSMC, "call", action, *params, "--credentials", str(self.data_dir / "admin-credentials.json")],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )
        if check and result.returncode != 0:
            raise AssertionError(f"opensmc call {action} failed: {result.stderr}")
        return result

    def call_json(self, action: str, *params: str) -> dict[str, object]:
        return dict(json.loads(self.call(action, *params).stdout))

    def call_json_with(self, credentials: Path, action: str, *params: str) -> dict[str, object]:
        """`opensmc call` with another credentials file (e.g. another server's account)."""
        result = subprocess.run(
            [*OPENSMC, "call", action, *params, "--credentials", str(credentials)],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )
        if result.returncode != 0:
            raise AssertionError(f"opensmc call {action} failed: {result.stderr}")
        return dict(json.loads(result.stdout))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIBABA_CLOUD_", "OPENSMC_"))}
    env.update(extra)
    return env


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listening on {url} after {timeout}s")


def start_server(
    data_dir: Path, *extra: str, port: int | None = None, extra_env: dict[str, str] | None = None
) -> ServerProcess:
    port = port or free_port()
    log = data_dir.parent / f"server-{port}.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            *OPENSMC,
            "server",
            "--data-dir",
            str(data_dir),
            "--listen",
            f"127.0.0.1:{port}",
            "--orchestrator-interval",
            "0.5",
            *(
                ()
                if any(e.startswith("--receiver-listen") for e in extra)
                else ("--receiver-listen", f"127.0.0.1:{free_port()}")
            ),
            *extra,
        ],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(**(extra_env or {})),
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/")
    except AssertionError:
        proc.kill()
        raise AssertionError(log.read_text()) from None
    return ServerProcess(proc, endpoint, data_dir, log)


def stop(proc: subprocess.Popen[str], sig_kill: bool = False) -> None:
    if proc.poll() is None:
        if sig_kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path / "data", "--heartbeat-grace", "3", "--heartbeat-rate", "1")
    yield srv
    stop(srv.proc)
