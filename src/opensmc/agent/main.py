"""The agent's command line: what ``opensmc agent run`` and the zipapp (``opensmc-agent.pyz``) run.

The zipapp the server serves (``GET /agent/opensmc-agent.pyz``, docs/agent.md)
holds this package's agent, wire and logging modules and a ``__main__`` that
calls :func:`main`; it runs on Python 3.6+ with the standard library only, so
nothing here may import the server's stack, the CLI's ``rich`` or anything
outside the standard library (tests/integration/test_agent_footprint.py).
"""

import argparse
import ipaddress
import os
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional
from urllib.parse import urlsplit

from opensmc import __version__, logs
from opensmc.agent import priority

if TYPE_CHECKING:
    from opensmc.agent.files import FileOptions

__all__ = ["AgentUsageError", "add_arguments", "main", "run"]


class AgentUsageError(Exception):
    """The command line cannot work as given; the message says what to fix (exit code 2)."""


def add_arguments(p: "argparse.ArgumentParser") -> None:
    p.add_argument("--server", required=True, help="the OpenSMC server URL, e.g. http://10.0.0.5:8080")
    p.add_argument(
        "--token-id",
        default=os.environ.get("OPENSMC_TOKEN_ID"),
        help="activation code ID (at-…) from CreateAccessToken (or $OPENSMC_TOKEN_ID)",
    )
    p.add_argument(
        "--token-code",
        default=os.environ.get("OPENSMC_TOKEN_CODE"),
        help="activation code from CreateAccessToken, shown once (or $OPENSMC_TOKEN_CODE)",
    )
    p.add_argument(
        "--access-key-id",
        default=os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_ID"),
        help="register with an AccessKey instead (or $ALIBABA_CLOUD_ACCESS_KEY_ID)",
    )
    p.add_argument(
        "--access-key-secret",
        default=os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET"),
        help="the AccessKey secret (or $ALIBABA_CLOUD_ACCESS_KEY_SECRET)",
    )
    p.add_argument(
        "--disk",
        action="append",
        default=None,
        help=(
            "a disk image file or block device to migrate instead of discovered disks (repeatable; first = system disk)"
        ),
    )
    p.add_argument(
        "--mount",
        action="append",
        default=None,
        metavar="DEVICE=DIR",
        help="where the files of partition DEVICE (e.g. 0_1) are, for partitions copied file by file "
        "(Block=false) that /proc/self/mountinfo does not show mounted (repeatable)",
    )
    p.add_argument(
        "--exclude-file",
        default=None,
        help="paths never to copy from partitions copied file by file: one rsync pattern per line, "
        "as SMC's client reads them (docs/agent.md)",
    )
    p.add_argument("--state-dir", type=Path, default=Path("opensmc-agent"), help="where the agent keeps its identity")
    p.add_argument("--ca-cert", type=Path, default=None, help="PEM CA bundle to trust for the server's TLS certificate")
    p.add_argument("--once", action="store_true", help="register and send one heartbeat, then exit")
    p.add_argument(
        "--insecure-http",
        action="store_true",
        help="send an AccessKey to a non-loopback server over plain http:// (refused by default)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=10,
        help="CPU priority: added to the agent's nice value, 0 leaves it (default: 10)",
    )
    p.add_argument(
        "--io-class",
        choices=priority.IO_CLASSES,
        default="best-effort",
        help="I/O scheduling class of the agent's disk reads, as ionice -c; best-effort and realtime at their "
        "lowest level, 7 (default: best-effort)",
    )
    p.add_argument(
        "--no-self-upgrade",
        action="store_true",
        help="do not replace this zipapp with the server's when the server runs another version",
    )
    logs.add_arguments(p)


def _plain_remote(server: str) -> bool:
    """An http:// URL whose host is not loopback: what is sent there crosses a network in clear."""
    url = urlsplit(server if "://" in server else f"http://{server}")
    if url.scheme != "http":
        return False
    host = url.hostname or ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host != "localhost"
    return not ip.is_loopback


def check_disks(disks: "Optional[List[str]]") -> None:
    """A --disk must be a regular file or a block device; anything else is a usage error, not a warning."""
    for path in disks or ():
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise AgentUsageError(f"--disk {path}: no such file or device") from None
        except OSError as exc:
            raise AgentUsageError(f"--disk {path}: {exc.strerror}") from None
        if stat.S_ISDIR(mode):
            raise AgentUsageError(f"--disk {path}: is a directory; give a disk image file or a block device")
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise AgentUsageError(f"--disk {path}: neither a regular file nor a block device")
        if not os.access(path, os.R_OK):
            raise AgentUsageError(f"--disk {path}: not readable by this user")


def file_options(args: "argparse.Namespace") -> "FileOptions":
    """--mount and --exclude-file, checked: a usage error for one that cannot work."""
    from opensmc.agent.files import FileOptions

    mounts = {}
    for item in getattr(args, "mount", None) or ():
        device, sep, directory = item.partition("=")
        if not sep or not device or not directory:
            raise AgentUsageError(f"--mount {item}: give DEVICE=DIR, e.g. --mount 0_1=/mnt/data")
        if not os.path.isdir(directory):
            raise AgentUsageError(f"--mount {item}: {directory} is not a directory")
        mounts[device] = os.path.abspath(directory)
    exclude = getattr(args, "exclude_file", None)
    if exclude and not os.access(exclude, os.R_OK):
        raise AgentUsageError(f"--exclude-file {exclude}: not a readable file")
    ca = getattr(args, "ca_cert", None)
    return FileOptions(mounts, exclude, str(ca) if ca else None)


def run(args: "argparse.Namespace") -> int:
    """Run the agent as ``args`` say; :class:`AgentUsageError` for a command line that cannot work."""
    from opensmc.agent.runner import AgentError, run_agent
    from opensmc.agent.upgrade import Upgrader
    from opensmc.malloc import AGENT_MMAP_THRESHOLD, tune_for_big_buffers

    tune_for_big_buffers(AGENT_MMAP_THRESHOLD)
    check_disks(args.disk)
    files = file_options(args)
    has_token = bool(args.token_id and args.token_code)
    has_key = bool(args.access_key_id and args.access_key_secret)
    state_file_exists = (args.state_dir / "agent.json").exists()
    if not (has_token or has_key or state_file_exists):
        raise AgentUsageError(
            "give --token-id and --token-code (from CreateAccessToken), or --access-key-id and --access-key-secret"
        )
    if has_key and not getattr(args, "insecure_http", False) and _plain_remote(args.server):
        raise AgentUsageError(
            f"refusing to send an AccessKey secret in clear to {args.server}: use an https:// "
            "server URL, an activation code (--token-id/--token-code), or --insecure-http"
        )
    if args.nice < 0:
        raise AgentUsageError(f"--nice {args.nice}: give 0 (unchanged) or more; the agent never raises its priority")
    logs.configure(args.log_level, args.log_format)
    import logging

    log = logging.getLogger("opensmc.agent")
    # --once reads no disk (one registration and heartbeat): it leaves the caller's priorities alone
    done = [] if args.once else priority.apply(args.nice, args.io_class)
    how = f" ({', '.join(done)})" if done else ""
    log.info("opensmc agent %s on Python %s%s", __version__, sys.version.split()[0], how)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    tls = None
    if args.ca_cert:
        import ssl

        tls = ssl.create_default_context(cafile=str(args.ca_cert))
    try:
        run_agent(
            args.server,
            token_id=args.token_id,
            token_code=args.token_code,
            access_key_id=args.access_key_id,
            access_key_secret=args.access_key_secret,
            disks=args.disk,
            state_dir=args.state_dir,
            once=args.once,
            stop_event=stop,
            ca_cert=args.ca_cert,
            upgrader=Upgrader(args.server, tls, enabled=not args.no_self_upgrade),
            file_options=files,
        )
    except AgentError as exc:
        print(f"opensmc agent: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: "Optional[List[str]]" = None) -> int:
    """The zipapp's entry point: ``python3 opensmc-agent.pyz --server URL --token-id … --token-code …``."""
    p = argparse.ArgumentParser(
        prog="opensmc-agent",
        description="OpenSMC's agent: registers this machine as a migration source and sends its disks.",
    )
    p.add_argument("--version", action="version", version=f"opensmc-agent {__version__}")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except AgentUsageError as exc:
        print(f"opensmc-agent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
