"""`opensmc agent run`: register this machine as a migration source and keep it online."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="the OpenSMC server URL, e.g. http://10.0.0.5:8080")
    p.add_argument("--token-id", default=None, help="activation code ID (at-…) from CreateAccessToken")
    p.add_argument("--token-code", default=None, help="activation code from CreateAccessToken (shown once)")
    p.add_argument("--access-key-id", default=os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_ID"))
    p.add_argument("--access-key-secret", default=os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET"))
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


def run(args: argparse.Namespace) -> int:
    from opensmc.agent.runner import AgentError, run_agent

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat is noise
    has_token = bool(args.token_id and args.token_code)
    has_key = bool(args.access_key_id and args.access_key_secret)
    state_file_exists = (args.state_dir / "agent.json").exists()
    if not (has_token or has_key or state_file_exists):
        print(
            "opensmc agent run: give --token-id and --token-code (from CreateAccessToken), "
            "or --access-key-id and --access-key-secret",
            file=sys.stderr,
        )
        return 2
    if has_key and not getattr(args, "insecure_http", False) and _plain_remote(args.server):
        print(
            f"opensmc agent run: refusing to send an AccessKey secret in clear to {args.server}: use an https:// "
            "server URL, an activation code (--token-id/--token-code), or --insecure-http",
            file=sys.stderr,
        )
        return 2
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
        print(f"opensmc agent: {exc}", file=sys.stderr)
        return 1
    return 0
