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
from typing import TYPE_CHECKING

from opensmc import logs
from opensmc.cli.credentials import default_data_dir
from opensmc.cli.errors import UsageError
from opensmc.malloc import tune_for_big_buffers

if TYPE_CHECKING:
    from opensmc.service.context import Services

# The server's own modules (Starlette, SQLAlchemy, aiohttp, …) are imported where the server
# starts, not here: `opensmc --help` and `opensmc agent run` build this parser too, and an
# agent on a source server must not carry the server in its memory (~50 MiB).

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
    p.add_argument(
        "--orchestrator-interval",
        type=float,
        default=0.5,
        help="seconds between orchestrator passes when no job change of this process wakes it",
    )
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
        "--receiver-capacity",
        type=int,
        default=None,
        help="runs this receiver takes at once (default 100); a job waits in Preparing while every live "
        "receiver is full",
    )
    p.add_argument(
        "--staging-dir",
        type=Path,
        default=None,
        help="where staging indexes live (default: <data-dir>/staging); every receiver and every orchestrator "
        "of an installation must share it (one filesystem, e.g. NFS)",
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
        "--image-store",
        default=None,
        help="where images are kept: s3://BUCKET/PREFIX for an S3-compatible object store (or OPENSMC_IMAGE_STORE; "
        "default: <data-dir>/store). S3 credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS "
        "profile, never from the command line. Staging indexes stay in the data dir",
    )
    p.add_argument(
        "--s3-endpoint", default=None, help="URL of the S3 service, e.g. http://rgw:7480 (default: AWS_ENDPOINT_URL)"
    )
    p.add_argument("--s3-region", default=None, help="S3 region (default: AWS_REGION, else us-east-1)")
    p.add_argument(
        "--insecure-http",
        action="store_true",
        help="accept agent registrations with an AccessKey over plain HTTP from other hosts (the secret "
        "crosses the network in clear; default: refused, use TLS)",
    )
    p.add_argument(
        "--disk-reserve",
        type=_mebibytes,
        default=64.0,
        metavar="MIB",
        help="MiB the receiver keeps free on the server's disk for the database: below it, writes of disk data "
        "are refused (the job turns InError Receiver.DiskFull) and the API keeps answering (default: 64)",
    )
    p.add_argument(
        "--no-space-check",
        action="store_true",
        help="start a run even when the selected disks' size (its worst case) exceeds the free space; by "
        "default such a run is refused: InError Server.InsufficientDiskSpace, saying how much space it needs",
    )
    p.add_argument("--no-receiver", action="store_true", help="do not run the data receiver in this process")
    p.add_argument("--no-orchestrator", action="store_true", help="serve the API only (another process orchestrates)")
    logs.add_arguments(p)


def _mebibytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 <= value < 1 << 30):  # NaN too
        raise argparse.ArgumentTypeError(f"expected a number of MiB (0 or more), got {text!r}")
    return value


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    from opensmc.service.context import is_loopback

    return is_loopback(host)


def _reachable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def receiver_address(args: argparse.Namespace) -> tuple[str, int]:
    if args.receiver_listen:
        return parse_listen(args.receiver_listen)
    host, port = parse_listen(args.listen)
    return host, port + 1


def build_services(args: argparse.Namespace) -> Services:
    from opensmc.service.context import Services, Settings
    from opensmc.store.db import Database, sqlite_url
    from opensmc.store.migrate import upgrade
    from opensmc.store.secretbox import SecretBox

    data_dir: Path = (args.data_dir or default_data_dir()).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if (data_dir / "images" / "chunks").is_dir():
        # The layout of 0.1 (one file per 64 KiB chunk): this version neither reads nor deletes it.
        log.warning(
            "%s holds images in the format of OpenSMC 0.1 (images/chunks); this version keeps images in "
            "%s and does not read the old ones: export them with OpenSMC 0.1 if you still need them",
            data_dir / "images",
            data_dir / "store",
        )
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
        image_store=image_store_url(args),
        s3_endpoint=args.s3_endpoint or "",
        s3_region=args.s3_region or "",
        insecure_http=bool(getattr(args, "insecure_http", False)),
        staging=args.staging_dir.resolve() if getattr(args, "staging_dir", None) else None,
        disk_reserve=int(float(getattr(args, "disk_reserve", 64.0)) * (1 << 20)),
        space_check=not getattr(args, "no_space_check", False),
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


def image_store_url(args: argparse.Namespace) -> str:
    """ "" for the data dir's store, else an s3:// URL (checked here: a typo is a usage error)."""
    url: str = args.image_store or os.environ.get("OPENSMC_IMAGE_STORE") or ""
    if not url:
        if args.s3_endpoint or args.s3_region:
            raise UsageError("--s3-endpoint and --s3-region need --image-store s3://BUCKET/PREFIX")
        return ""
    if url.startswith("s3://"):
        from opensmc.chunkstore.s3 import parse_s3_url

        try:
            parse_s3_url(url)
        except ValueError as exc:
            raise UsageError(f"--image-store: {exc}") from None
        return url
    raise UsageError(f"--image-store takes s3://BUCKET/PREFIX (the default is the data dir), got {url!r}")


ROLES = ("api", "orchestrator", "receiver")


def roles_of(args: argparse.Namespace) -> set[str]:
    roles = {r.strip() for r in str(args.roles).split(",") if r.strip()}
    unknown = roles - set(ROLES)
    if unknown or not roles:
        raise UsageError(f"--roles takes {', '.join(ROLES)}; got {args.roles!r}")
    if args.no_receiver:
        roles.discard("receiver")
    if args.no_orchestrator:
        roles.discard("orchestrator")
    if not roles:
        raise UsageError("no role left to run")
    return roles


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from opensmc.api.agent_routes import routes as agent_routes
    from opensmc.api.app import create_app
    from opensmc.api.image_routes import routes as image_routes
    from opensmc.api.serving import server_config
    from opensmc.images.store import ImageStore, repository_at
    from opensmc.orchestrator.loop import Orchestrator
    from opensmc.receiver.serve import ReceiverThread
    from opensmc.service import accounts, agent_tasks, space
    from opensmc.service.receivers import DEFAULT_CAPACITY, Presence

    tune_for_big_buffers()
    logs.configure(args.log_level, args.log_format)
    # Migrated disks, images and the database hold other people's data: nothing this
    # process creates is readable by other local users (dirs 0700, files 0600).
    os.umask(0o077)
    roles = roles_of(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("opensmc server: error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    tls: ssl.SSLContext | None = None
    if args.tls_cert:
        try:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"opensmc server: error: cannot load the TLS certificate: {exc}", file=sys.stderr)
            return 2
    try:
        svc = build_services(args)
    except UsageError:
        raise
    except Exception as exc:
        print(f"opensmc server: error: cannot open the database: {exc}", file=sys.stderr)
        return 2
    try:
        repository_at(svc.settings.image_location)  # fail now, not at the first job, on a wrong store
    except Exception as exc:
        print(
            f"opensmc server: error: cannot open the image store {svc.settings.image_location.url}: {exc}",
            file=sys.stderr,
        )
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
            f"data dir: {svc.settings.data_dir}, images: {svc.settings.image_store or 'in the data dir'})",
            flush=True,
        )
    capacity = args.receiver_capacity if args.receiver_capacity is not None else DEFAULT_CAPACITY
    if capacity < 1:
        print("opensmc server: error: --receiver-capacity must be at least 1", file=sys.stderr)
        return 2
    receiver = None
    presence = None
    if "receiver" in roles:
        r_host, r_port = receiver_address(args)
        receiver = ReceiverThread(
            svc.settings.staging_dir,
            repository_at(svc.settings.image_location),
            lambda token, vid: agent_tasks.authorize(svc, token, vid),
            r_host,
            r_port,
            ssl_context=tls,
            space=space.guard(svc),
            on_full=lambda vid, message: agent_tasks.receiver_disk_full(svc, vid, message),
        )
        try:
            receiver.start()
        except RuntimeError as exc:
            print(f"opensmc server: error: {exc}", file=sys.stderr)
            return 2
        # Registered under the URL agents are told: the orchestrators place runs on it from now on.
        presence = Presence(svc, svc.settings.receiver_endpoint, capacity)
        try:
            presence.start()
        except Exception as exc:
            receiver.stop()
            print(f"opensmc server: error: cannot register the receiver in the database: {exc}", file=sys.stderr)
            return 2
        if r_host in ("0.0.0.0", "::", "") and not args.receiver_endpoint:
            log.warning(
                "the receiver listens on all addresses but tells agents %s: give it --receiver-endpoint "
                "with an address agents on other hosts reach",
                svc.settings.receiver_endpoint,
            )
        print(f"Data receiver on {svc.settings.receiver_endpoint} (capacity {capacity} runs)", flush=True)
    if "orchestrator" in roles:
        # A crash may have left packs without index or an unfinished collection: the first
        # pass after a start collects them (it costs one look at the store when there are none).
        ImageStore(svc.settings.image_location).want_gc()
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
            if presence:
                presence.stop()
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
        # Agents hold a task long-poll open (up to a minute): without a bound, a stop
        # would wait for each of them to answer. The agent reconnects on its own.
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        if orchestrator:
            orchestrator.stop()
        if presence:
            presence.stop()
        if receiver:
            receiver.stop()
        svc.db.dispose()
    return 0
