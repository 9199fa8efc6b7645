"""Hosts on one machine: network namespaces on a bridge, for tests and benchmarks of several hosts.

Each host is a network namespace (``ip netns``, iproute2) with one veth pair
to a bridge in the root namespace; the bridge has the subnet's first address
and reaches every host, and the hosts reach each other through it. The root
namespace's loopback services (PostgreSQL on 127.0.0.1) are offered on the
bridge address by a ``socat`` forwarder (:meth:`Hosts.forward`). Nothing is
routed anywhere else: traffic stays between these namespaces.

The namespaces share the machine's filesystem and PID space: a directory is
"shared storage" for all hosts, and a process started in a host (``ip netns
exec`` replaces itself with the command) is killed by its PID as usual.
Everything is removed on exit, whatever happened; needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field


class NetnsUnavailable(RuntimeError):
    """This machine (or user) cannot make network namespaces."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def probe() -> str | None:
    """Why hosts cannot be made here, or None if they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    name = f"osmc-probe-{uuid.uuid4().hex[:6]}"
    res = _ip("netns", "add", name, check=False)
    if res.returncode != 0:
        return f"`ip netns add` is not permitted here: {res.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    if shutil.which("socat") is None:
        return "socat is not installed (scripts/setup installs it)"
    return None


@dataclass
class Hosts:
    tag: str
    subnet: str  #: the first three octets, e.g. "10.201.7"
    names: list[str]
    _forwarders: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"os{self.tag}b"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge (forwarded services live there)."""
        return f"{self.subnet}.1"

    def ns(self, host: str) -> str:
        return f"osmc-{self.tag}-{host}"

    def addr(self, host: str) -> str:
        return f"{self.subnet}.{self.names.index(host) + 2}"

    def cmd(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside `host` (exec'd in place: the PID is the command's)."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def forward(self, target_port: int, target_host: str = "127.0.0.1") -> int:
        """Offer `target_host:target_port` of the root namespace on the bridge; returns the bridge port."""
        with socket.socket() as s:
            s.bind((self.gateway, 0))
            port = int(s.getsockname()[1])
        proc = subprocess.Popen(
            [
                "socat",
                f"TCP-LISTEN:{port},bind={self.gateway},fork,reuseaddr",
                f"TCP:{target_host}:{target_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._forwarders.append(proc)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.gateway, port), 0.2).close()
                return port
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"socat could not listen on {self.gateway}:{port}") from None
                time.sleep(0.05)

    def _setup(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, host in enumerate(self.names):
            ns, outside, inside = self.ns(host), f"os{self.tag}v{i}", f"os{self.tag}p{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def teardown(self) -> None:
        for proc in self._forwarders:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for host in self.names:
            _ip("netns", "del", self.ns(host), check=False)  # its veth end goes with it, and so the pair
        _ip("link", "del", self.bridge, check=False)


@contextmanager
def hosts(names: Sequence[str]) -> Iterator[Hosts]:
    """Namespaces named `names` on a bridge of their own; removed on exit even on failure."""
    why = probe()
    if why:
        raise NetnsUnavailable(why)
    tag = uuid.uuid4().hex[:4]
    subnet = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:], 16)}"
    h = Hosts(tag, subnet, list(names))
    try:
        h._setup()
        yield h
    finally:
        h.teardown()
