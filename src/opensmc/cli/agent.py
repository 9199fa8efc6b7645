"""`opensmc agent run|install|uninstall`: the agent on a source server, in the foreground or as a service."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from opensmc import logs
from opensmc.cli.errors import UsageError

RAW = argparse.RawDescriptionHelpFormatter


def add_subcommands(sub: Any) -> None:
    add_arguments(
        sub.add_parser(
            "run",
            help="register this machine and keep heartbeating (foreground)",
            formatter_class=RAW,
            epilog="examples:\n"
            "  opensmc agent run --server http://10.0.0.5:8080 --token-id at-… --token-code …\n"
            "  opensmc agent run --server http://10.0.0.5:8080 --disk /dev/vda --state-dir ./agent-state",
        )
    )
    from opensmc.cli import service

    service.add_install_arguments(
        sub.add_parser(
            "install",
            help="install the agent as a systemd service and start it",
            formatter_class=RAW,
            epilog="examples:\n"
            "  sudo opensmc agent install --server https://smc.example:8080 --token-id at-… --token-code …\n"
            "  opensmc agent install --server http://10.0.0.5:8080 --print     # only show the unit",
        )
    )
    service.add_uninstall_arguments(sub.add_parser("uninstall", help="stop and remove the agent's systemd service"))


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--state-dir", type=Path, default=Path("opensmc-agent"), help="where the agent keeps its identity")
    p.add_argument("--ca-cert", type=Path, default=None, help="PEM CA bundle to trust for the server's TLS certificate")
    p.add_argument("--once", action="store_true", help="register and send one heartbeat, then exit")
    p.add_argument(
        "--insecure-http",
        action="store_true",
        help="send an AccessKey to a non-loopback server over plain http:// (refused by default)",
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


def check_disks(disks: list[str] | None) -> None:
    """A --disk must be a regular file or a block device; anything else is a usage error, not a warning."""
    for path in disks or ():
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise UsageError(f"--disk {path}: no such file or device") from None
        except OSError as exc:
            raise UsageError(f"--disk {path}: {exc.strerror}") from None
        if stat.S_ISDIR(mode):
            raise UsageError(f"--disk {path}: is a directory; give a disk image file or a block device")
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise UsageError(f"--disk {path}: neither a regular file nor a block device")
        if not os.access(path, os.R_OK):
            raise UsageError(f"--disk {path}: not readable by this user")


def run_command(args: argparse.Namespace) -> int:
    if args.agent_command == "run":
        return run(args)
    from opensmc.cli import service

    if args.agent_command == "install":
        return service.install(args)
    return service.uninstall(args)


def run(args: argparse.Namespace) -> int:
    from opensmc.agent.runner import AgentError, run_agent
    from opensmc.malloc import tune_for_big_buffers

    tune_for_big_buffers()
    check_disks(args.disk)
    has_token = bool(args.token_id and args.token_code)
    has_key = bool(args.access_key_id and args.access_key_secret)
    state_file_exists = (args.state_dir / "agent.json").exists()
    if not (has_token or has_key or state_file_exists):
        raise UsageError(
            "give --token-id and --token-code (from CreateAccessToken), or --access-key-id and --access-key-secret"
        )
    if has_key and not getattr(args, "insecure_http", False) and _plain_remote(args.server):
        raise UsageError(
            f"refusing to send an AccessKey secret in clear to {args.server}: use an https:// "
            "server URL, an activation code (--token-id/--token-code), or --insecure-http"
        )
    logs.configure(args.log_level, args.log_format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
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
        )
    except AgentError as exc:
        print(f"opensmc agent: error: {exc}", file=sys.stderr)
        return 1
    return 0
