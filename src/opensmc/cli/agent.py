"""`opensmc agent run`: register this machine as a migration source and keep it online."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path


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
