"""An OpenSMC installation over several hosts (network namespaces, ``tests/netns.py``).

One PostgreSQL database (the root namespace's, offered on the bridge by a
forwarder), one data directory shared by every server process (the
namespaces share the filesystem: it stands for the shared filesystem, e.g.
NFS, that holds the staging indexes, the master key and, here, the image
store), and ``opensmc server`` / ``opensmc agent run`` processes each in the
host it is told. Used by tests/e2e/test_receiver_hosts.py and
bench/bench_load.py.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import make_url

from tests.e2e.conftest import OPENSMC, ServerProcess, clean_env, stop
from tests.e2e.flows import Agent
from tests.netns import Hosts

API_PORT = 8080
RECEIVER_PORT = 8081


@dataclass
class Installation:
    hosts: Hosts
    data: Path
    pg_url: str  #: the database, as the root namespace reaches it
    db_port: int  #: the forwarder's port on the bridge
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def db_url(self) -> str:
        """The database as the hosts reach it (through the forwarder on the bridge)."""
        return make_url(self.pg_url).set(host=self.hosts.gateway, port=self.db_port).render_as_string(False)

    def _start(self, host: str, argv: list[str], log: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            self.hosts.cmd(host, argv), stdout=log.open("a"), stderr=subprocess.STDOUT, text=True, env=clean_env()
        )
        self.procs.append(proc)
        return proc

    def _wait_listening(self, proc: subprocess.Popen[str], host: str, port: int, log: Path) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection((self.hosts.addr(host), port), 0.5).close()
                return
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"nothing on {host}:{port}:\n{log.read_text()}") from None
                time.sleep(0.1)

    def server(self, host: str, roles: str, *extra: str) -> ServerProcess:
        """`opensmc server --roles roles` on `host`: the API on :8080, a receiver on :8081."""
        addr = self.hosts.addr(host)
        log = self.data.parent / f"{host}-{roles.replace(',', '+')}.log"
        argv = [
            *OPENSMC,
            "server",
            "--data-dir",
            str(self.data),
            "--database",
            self.db_url,
            "--roles",
            roles,
            "--listen",
            f"{addr}:{API_PORT}",
            "--receiver-listen",
            f"{addr}:{RECEIVER_PORT}",
            *extra,
        ]
        proc = self._start(host, argv, log)
        if "api" in roles:
            self._wait_listening(proc, host, API_PORT, log)
        elif "receiver" in roles:
            self._wait_listening(proc, host, RECEIVER_PORT, log)
            wait_logged(log, "Data receiver on", proc)  # registered in the database by then
        else:
            wait_logged(log, "Orchestrator running", proc)
        return ServerProcess(proc, f"http://{addr}:{API_PORT}", self.data, log)

    def agent(self, host: str, server: ServerProcess, token: dict[str, Any], disk: Path, state: Path) -> Agent:
        return HostedAgent(self, host, server, token, [disk], state).start()

    def receiver_url(self, host: str) -> str:
        return f"http://{self.hosts.addr(host)}:{RECEIVER_PORT}"

    def stop_all(self) -> None:
        """SIGTERM to every process at once, then SIGKILL to those still running after 15 s."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop(proc, sig_kill=True)


class HostedAgent(Agent):
    """An agent process in one of the installation's hosts."""

    def __init__(
        self,
        install: Installation,
        host: str,
        server: ServerProcess,
        token: dict[str, Any],
        disks: list[Path],
        state: Path,
    ) -> None:
        super().__init__(server, token, disks, state)
        self.install = install
        self.host = host

    def start(self, server: ServerProcess | None = None) -> Agent:
        self.server = server or self.server
        argv = [
            *OPENSMC,
            "agent",
            "run",
            "--server",
            self.server.endpoint,
            "--token-id",
            str(self.token["AccessTokenId"]),
            "--token-code",
            str(self.token["AccessTokenCode"]),
            "--state-dir",
            str(self.state),
        ]
        for d in self.disks:
            argv += ["--disk", str(d)]
        self.proc = self.install._start(self.host, argv, self.log)
        return self


def wait_logged(log: Path, text: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text() if log.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never logged:\n{log.read_text() if log.exists() else ''}")
        time.sleep(0.1)
