"""The agent replaces itself when the server runs another version (docs/agent.md, "Upgrades").

Heartbeat replies carry the server's version (``server_version``). An agent
running from the server's zipapp whose own version differs downloads the
zipapp again from the same server (``GET /agent/opensmc-agent.pyz``), checks
it against the SHA-256 the server publishes (``GET
/agent/opensmc-agent.pyz.sha256``, over the same TLS connection settings), writes it
beside the running file, fsyncs it and renames it over the old one (a crash
leaves the old file or the new one, never half of one), then re-executes
itself with the same arguments. It does this only between tasks, never while
one is sending. An agent not run from a zipapp (``opensmc agent run`` from an
installed package) only logs that the server is newer. Python 3.6
compatible, standard library only.
"""

import hashlib
import logging
import os
import ssl
import sys
import urllib.request
import zipfile
from typing import List, Optional

from opensmc import __version__

log = logging.getLogger("opensmc.agent")

PYZ_PATH = "/agent/opensmc-agent.pyz"
SHA256_PATH = PYZ_PATH + ".sha256"


class UpgradeError(Exception):
    """The new agent could not be fetched or did not match its checksum; the old one keeps running."""


def running_pyz() -> "Optional[str]":
    """The zipapp this process runs from, or None (run from an installed package)."""
    path = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if path.endswith(".pyz") and os.path.isfile(path) and zipfile.is_zipfile(path):
        return path
    return None


def _get(url: str, tls: "Optional[ssl.SSLContext]", limit: int) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": f"opensmc-agent/{__version__}"})
    try:
        with urllib.request.urlopen(req, timeout=120, context=tls) as resp:
            data = resp.read(limit + 1)
    except OSError as e:  # URLError and HTTPError are OSErrors
        raise UpgradeError(f"cannot download {url}: {e}") from e
    if len(data) > limit:
        raise UpgradeError(f"{url} is larger than {limit} bytes")
    return bytes(data)


def fetch(server_url: str, tls: "Optional[ssl.SSLContext]") -> bytes:
    """The server's zipapp, checked against its published SHA-256."""
    base = server_url.rstrip("/")
    published = _get(base + SHA256_PATH, tls, 1024).decode("ascii", "replace").split()
    if not published or len(published[0]) != 64:
        raise UpgradeError(f"{base + SHA256_PATH} does not hold a SHA-256")
    blob = _get(base + PYZ_PATH, tls, 64 * 1024 * 1024)
    actual = hashlib.sha256(blob).hexdigest()
    if actual != published[0].lower():
        raise UpgradeError(f"the downloaded agent's SHA-256 is {actual}, the server publishes {published[0]}")
    return blob


def replace_file(path: str, blob: bytes) -> None:
    """Write ``blob`` over ``path`` atomically (temporary file, fsync, rename, fsync of the directory)."""
    tmp = f"{path}.{os.getpid()}.new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Upgrader:
    """Called with the server's version after each heartbeat (from the runner's main loop)."""

    def __init__(self, server_url: str, tls: "Optional[ssl.SSLContext]", enabled: bool = True) -> None:
        self.server_url = server_url
        self.tls = tls
        self.enabled = enabled
        self._tried: "List[str]" = []  # server versions already handled: try each once per process

    def check(self, server_version: str) -> None:
        """Replace and re-execute this agent when ``server_version`` is not its own (does not return then)."""
        if not server_version or server_version == __version__ or server_version in self._tried:
            return
        self._tried.append(server_version)
        path = running_pyz()
        if path is None or not self.enabled:
            log.warning(
                "the server runs version %s, this agent %s%s",
                server_version,
                __version__,
                "" if path else ": upgrade this installation (the server's install command does it)",
            )
            return
        log.info("the server runs version %s, this agent %s: upgrading %s", server_version, __version__, path)
        try:
            blob = fetch(self.server_url, self.tls)
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).digest() == hashlib.sha256(blob).digest():
                    log.warning("the server's agent is this very file (version %s); not upgrading", __version__)
                    return
            replace_file(path, blob)
        except (UpgradeError, OSError) as e:
            log.error("agent upgrade failed, this version keeps running: %s", e)
            return
        log.info("agent upgraded to the server's version %s; restarting", server_version)
        for handler in logging.getLogger().handlers:
            handler.flush()
        try:
            os.execv(sys.executable, [sys.executable, path, *sys.argv[1:]])
        except OSError as e:  # the new file is in place: a restart (systemd's, or the next install) runs it
            log.error("cannot restart as the upgraded agent (%s); restart it to run version %s", e, server_version)
