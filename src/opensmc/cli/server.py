"""`opensmc server`: the API, the agent API and the orchestrator in one process.

The embedded default needs nothing but a data directory: SQLite at
`<data-dir>/opensmc.db`. `--database postgresql://…` (or
`OPENSMC_DATABASE_URL`) runs the same server on PostgreSQL; any number of
server processes may share one PostgreSQL database.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import sys
import threading
from datetime import timedelta
from pathlib import Path

import uvicorn

from opensmc.api.agent_routes import routes as agent_routes
from opensmc.api.app import create_app
from opensmc.api.image_routes import routes as image_routes
from opensmc.api.serving import server_config
from opensmc.cli.credentials import default_data_dir
from opensmc.orchestrator.loop import Orchestrator
from opensmc.receiver.serve import ReceiverThread
from opensmc.service import accounts, dataplane
from opensmc.service.context import Services, Settings, is_loopback
from opensmc.store.db import Database, sqlite_url
from opensmc.store.migrate import upgrade
from opensmc.store.secretbox import SecretBox

log = logging.getLogger("opensmc.server")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None, help="where the database (SQLite), images and keys live")
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT for the API (default 127.0.0.1:8080)")
    p.add_argument(
        "--database",
        default=None,
        help="database URL (default: SQLite in the data dir; or OPENSMC_DATABASE_URL), e.g. postgresql://user@host/db",
    )
    p.add_argument(
        "--region",
        action="append",
        default=None,
        help="a region this server serves (repeatable; default: local)",
    )
    p.add_argument(
        "--public-endpoint",
        default=None,
        help="URL clients use to reach the API, written to the credentials file (default from --listen)",
    )
    p.add_argument(
        "--heartbeat-grace",
        type=float,
        default=90.0,
        help="seconds without heartbeat before a source is Unavailable",
    )
    p.add_argument("--heartbeat-rate", type=int, default=10, help="seconds between agent heartbeats")
    p.add_argument("--orchestrator-interval", type=float, default=2.0, help="seconds between orchestrator passes")
    p.add_argument(
        "--receiver-listen",
        default=None,
        help="HOST:PORT for the data receiver (default: the API host, port + 1)",
    )
    p.add_argument(
        "--receiver-endpoint",
        default=None,
        help="URL agents send disk data to (default from --receiver-listen)",
    )
    p.add_argument(
        "--tls-cert", type=Path, default=None, help="PEM certificate (chain): serve API and receiver over TLS"
    )
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert")
    p.add_argument(
        "--roles",
        default="api,orchestrator,receiver",
        help="what this process runs, comma-separated: api, orchestrator, receiver (default: all three). "
        "Processes with other roles share the database; a receiver shares the data dir's staging volumes "
        "with the orchestrators (same machine or a shared filesystem)",
    )
    p.add_argument(
        "--insecure-http",
        action="store_true",
        help="accept agent registrations with an AccessKey over plain HTTP from other hosts (the secret "
        "crosses the network in clear; default: refused, use TLS)",
    )
    p.add_argument("--no-receiver", action="store_true", help="do not run the data receiver in this process")
    p.add_argument("--no-orchestrator", action="store_true", help="serve the API only (another process orchestrates)")


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"opensmc server: --listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    return is_loopback(host)


def _reachable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def receiver_address(args: argparse.Namespace) -> tuple[str, int]:
    if args.receiver_listen:
        return parse_listen(args.receiver_listen)
    host, port = parse_listen(args.listen)
    return host, port + 1


def build_services(args: argparse.Namespace) -> Services:
    data_dir: Path = (args.data_dir or default_data_dir()).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    url = args.database or os.environ.get("OPENSMC_DATABASE_URL") or sqlite_url(data_dir / "opensmc.db")
    host, port = parse_listen(args.listen)
    scheme = "https" if args.tls_cert else "http"
    endpoint = args.public_endpoint or f"{scheme}://{_reachable(host)}:{port}"
    r_host, r_port = receiver_address(args)
    receiver_endpoint = args.receiver_endpoint or f"{scheme}://{_reachable(r_host)}:{r_port}"
    settings = Settings(
        data_dir=data_dir,
        regions=tuple(args.region or ["local"]),
        public_endpoint=endpoint,
        receiver_endpoint=receiver_endpoint,
        heartbeat_grace=timedelta(seconds=args.heartbeat_grace),
        heartbeat_rate=args.heartbeat_rate,
        insecure_http=bool(getattr(args, "insecure_http", False)),
    )
    secure_data_dir(data_dir)
    db = Database(url)
    upgrade(db)
    services = Services(db=db, settings=settings, secrets=SecretBox.from_env_or_file(data_dir))
    secure_data_dir(data_dir)  # again: the database and the master key now exist
    return services


#: What the server keeps in its data dir (staging volumes, images, keys, the SQLite
#: database) is readable by the server's user alone, whatever umask it was started with.
PRIVATE_DIRS = ("", "staging", "images", "tmp")


def secure_data_dir(data_dir: Path) -> None:
    """0700 on the data dir and its data directories, 0600 on the files at its top.

    Files created later inherit the process umask, which :func:`run` sets to
    0077; this fixes what an earlier version (or another umask) left behind.
    A file deeper down is then behind a 0700 directory either way.
    """
    for name in PRIVATE_DIRS:
        d = data_dir / name
        if d.is_dir():
            d.chmod(0o700)
    for f in data_dir.iterdir():
        if f.is_file() and not f.is_symlink():
            f.chmod(0o600)


ROLES = ("api", "orchestrator", "receiver")


def roles_of(args: argparse.Namespace) -> set[str]:
    roles = {r.strip() for r in str(args.roles).split(",") if r.strip()}
    unknown = roles - set(ROLES)
    if unknown or not roles:
        raise SystemExit(f"opensmc server: --roles takes {', '.join(ROLES)}; got {args.roles!r}")
    if args.no_receiver:
        roles.discard("receiver")
    if args.no_orchestrator:
        roles.discard("orchestrator")
    if not roles:
        raise SystemExit("opensmc server: no role left to run")
    return roles


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Migrated disks, images and the database hold other people's data: nothing this
    # process creates is readable by other local users (dirs 0700, files 0600).
    os.umask(0o077)
    roles = roles_of(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("opensmc server: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    tls: ssl.SSLContext | None = None
    if args.tls_cert:
        try:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"opensmc server: cannot load the TLS certificate: {exc}", file=sys.stderr)
            return 2
    try:
        svc = build_services(args)
    except Exception as exc:
        print(f"opensmc server: cannot open the database: {exc}", file=sys.stderr)
        return 2
    host, port = parse_listen(args.listen)
    if tls is None:
        listeners = []
        if "api" in roles:
            listeners.append(("API and agent API", host))
        if "receiver" in roles:
            listeners.append(("data receiver", receiver_address(args)[0]))
        for what, where in listeners:
            if not _is_loopback(where):
                log.warning(
                    "serving the %s over plain HTTP on %s: AccessKey-signed requests, agent credentials and disk "
                    "data cross the network unencrypted; use --tls-cert/--tls-key or a TLS proxy",
                    what,
                    where,
                )
    db_kind = "SQLite" if svc.db.is_sqlite else "PostgreSQL"
    if "api" in roles:
        written = accounts.bootstrap_admin(svc, svc.settings.public_endpoint)
        if written:
            print(f"Created the first account. Its AccessKey pair is in {written} (mode 0600).", flush=True)
        print(
            f"OpenSMC API on {svc.settings.public_endpoint} ({db_kind}, "
            f"regions: {', '.join(svc.settings.regions)}, "
            f"data dir: {svc.settings.data_dir})",
            flush=True,
        )
    receiver = None
    if "receiver" in roles:
        r_host, r_port = receiver_address(args)
        receiver = ReceiverThread(
            svc.settings.staging_dir,
            lambda token, vid: dataplane.authorize(svc, token, vid),
            r_host,
            r_port,
            ssl_context=tls,
        )
        try:
            receiver.start()
        except RuntimeError as exc:
            print(f"opensmc server: {exc}", file=sys.stderr)
            return 2
        print(f"Data receiver on {svc.settings.receiver_endpoint}", flush=True)
    orchestrator = None
    if "orchestrator" in roles:
        orchestrator = Orchestrator(svc, args.orchestrator_interval)
        orchestrator.start()
        print(f"Orchestrator running ({db_kind}, every {args.orchestrator_interval:g} s)", flush=True)
    if "api" not in roles:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        try:
            stop.wait()
        finally:
            if orchestrator:
                orchestrator.stop()
            if receiver:
                receiver.stop()
            svc.db.dispose()
        return 0
    app = create_app(svc, [*agent_routes, *image_routes])
    config = server_config(
        app,
        host,
        port,
        ssl_certfile=str(args.tls_cert) if args.tls_cert else None,
        ssl_keyfile=str(args.tls_key) if args.tls_key else None,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        if orchestrator:
            orchestrator.stop()
        if receiver:
            receiver.stop()
        svc.db.dispose()
    return 0
