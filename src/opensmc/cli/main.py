"""The `opensmc` command: server, agent, call, and friendly views.

Every command reports a failure the same way (see :mod:`opensmc.cli.errors`):
one line ``opensmc COMMAND: error: …`` on stderr and a documented exit code,
never a Python traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import httpx

from opensmc import __version__
from opensmc.cli import errors
from opensmc.cli.errors import CliError

RAW = argparse.RawDescriptionHelpFormatter

EXIT_CODES = """exit codes:
  0 success; 1 the server or the operation said no; 2 usage or configuration error;
  3 server unreachable; 70 internal error; 130 interrupted; 141 output pipe closed"""

CREDENTIALS_HELP = (
    "JSON file with access_key_id, access_key_secret and endpoint, as `opensmc server` writes it "
    "(default: $OPENSMC_CREDENTIALS, ./opensmc-data/admin-credentials.json, ~/.config/opensmc/credentials.json, "
    "then the aliyun CLI's ~/.aliyun/config.json)"
)
ENDPOINT_HELP = "the OpenSMC API URL, e.g. http://127.0.0.1:8080 (default: $OPENSMC_ENDPOINT or the credentials file)"


def add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--credentials", default=None, metavar="FILE", help=CREDENTIALS_HELP)
    p.add_argument("--endpoint", default=None, metavar="URL", help=ENDPOINT_HELP)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; `command` (the first argument) skips what that command cannot show.

    Listing every action for `call --help` imports the action registry and with it the
    server's modules; `opensmc agent run` on a source server must not pay that memory.
    """
    parser = argparse.ArgumentParser(
        prog="opensmc",
        description="OpenSMC: a self-hosted Server Migration Center",
        formatter_class=RAW,
        epilog="examples:\n"
        "  opensmc demo                     # a whole migration on this machine\n"
        "  opensmc server                   # API on 127.0.0.1:8080, data in ./opensmc-data\n"
        "  opensmc call DescribeSourceServers\n"
        "  opensmc jobs --json\n\n" + EXIT_CODES,
    )
    parser.add_argument("--version", action="version", version=f"opensmc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from opensmc.cli import server

    p_server = sub.add_parser(
        "server",
        help="run the API, agent API, orchestrator and data receiver",
        description="Run OpenSMC's control plane and data plane (all roles in one process by default).",
        formatter_class=RAW,
        epilog="examples:\n"
        "  opensmc server\n"
        "  opensmc server --listen 0.0.0.0:8080 --tls-cert cert.pem --tls-key key.pem\n"
        "  opensmc server --roles api --database postgresql://smc@db/smc --log-format json",
    )
    server.add_arguments(p_server)

    from opensmc.cli import call

    p_call = sub.add_parser(
        "call",
        help="call any SMC action, signed: opensmc call ACTION --Param value …",
        description="Call any SMC action, signed with your AccessKey. Parameters as on the wire: "
        "--JobId j-… --DataDisk.1.Size 40. Prints the JSON answer.",
        formatter_class=RAW,
        epilog=(call.actions_epilog() if command in (None, "call") else "see: opensmc call --help")
        + "\n\n"
        + EXIT_CODES,
    )
    p_call.add_argument("action", help="the SMC action, e.g. DescribeReplicationJobs")
    add_client_options(p_call)

    p_agent = sub.add_parser("agent", help="the agent that runs on a source server")
    agent_sub = p_agent.add_subparsers(dest="agent_command", metavar="SUBCOMMAND")
    from opensmc.cli import agent as agent_cli

    agent_cli.add_subcommands(agent_sub)

    from opensmc.cli import images as images_cli
    from opensmc.cli import views

    views.add_arguments(sub)

    images_cli.add_arguments(
        sub.add_parser(
            "image",
            help="list, show, export and verify migrated images",
            formatter_class=RAW,
            epilog="examples:\n"
            "  opensmc image list\n"
            "  opensmc image export m-… --disk 0 --format qcow2 -o disk.qcow2\n"
            "  opensmc image verify m-…",
        )
    )

    from opensmc.cli import store as store_cli

    store_cli.add_arguments(
        sub.add_parser(
            "store",
            help="check or garbage-collect the image store (on the server's data dir)",
            formatter_class=RAW,
            epilog="examples:\n"
            "  opensmc store check --data-dir opensmc-data\n"
            "  opensmc store gc --data-dir opensmc-data",
        )
    )

    from opensmc.cli import demo

    demo.add_arguments(sub.add_parser("demo", help="a complete migration on this machine, for a first look"))

    p_admin = sub.add_parser("admin", help="accounts, AccessKeys and the master key (on the server)")
    if command in (None, "admin"):  # it imports the server's database stack: only when asked for
        from opensmc.cli import admin

        admin.add_arguments(p_admin)

    p_db = sub.add_parser("db", help="database maintenance")
    db_sub = p_db.add_subparsers(dest="db_command", metavar="SUBCOMMAND")
    p_up = db_sub.add_parser("upgrade", help="apply schema migrations")
    p_up.add_argument("--database", required=True, help="database URL, e.g. postgresql://user@host/db")
    p_copy = db_sub.add_parser(
        "copy",
        help="copy a whole database into a new, empty one (e.g. SQLite to PostgreSQL)",
        description="Copy every row of one OpenSMC database into another, empty one, in one transaction: move "
        "an embedded install (SQLite) onto PostgreSQL. Stop every server first. Both are migrated to the current "
        "schema. The servers on the destination need the same master key (master.key or OPENSMC_MASTER_KEY).",
    )
    p_copy.add_argument("--from", dest="source", required=True, help="e.g. sqlite:////var/lib/opensmc/opensmc.db")
    p_copy.add_argument("--to", dest="destination", required=True, help="e.g. postgresql://smc@db/opensmc")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at interpreter exit, so that a closed pipe is caught below
        return code
    except CliError as exc:
        return _fail(command, str(exc), exc.exit_code)
    except httpx.TransportError as exc:
        try:
            where = f"{exc.request.url.scheme}://{exc.request.url.netloc.decode()}"
        except RuntimeError:  # raised before a request existed
            where = "the server"
        return _fail(command, f"cannot reach {where}: {exc}", errors.UNREACHABLE)
    except httpx.HTTPError as exc:
        return _fail(command, f"talking to the server failed: {exc}", errors.FAILED)
    except KeyboardInterrupt:
        return _fail(command, "interrupted", errors.INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`… | head`): say nothing more, and keep Python from
        # complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return errors.BROKEN_PIPE
    except OSError as exc:
        return _fail(command, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), errors.FAILED)
    except Exception as exc:
        if os.environ.get("OPENSMC_DEBUG"):
            raise
        return _fail(
            command,
            f"internal error {type(exc).__name__}: {exc} "
            "(a bug: please report it; OPENSMC_DEBUG=1 shows the traceback)",
            errors.INTERNAL,
        )


def _fail(command: str, message: str, code: int) -> int:
    prog = f"opensmc {command}" if command else "opensmc"
    try:
        print(f"{prog}: error: {message}", file=sys.stderr)
    except (BrokenPipeError, OSError):
        pass
    return code


def _main(argv: list[str]) -> int:
    parser = build_parser(argv[0] if argv and not argv[0].startswith("-") else None)
    # `call` takes free-form --Param pairs, which argparse cannot know in advance.
    extra: list[str] = []
    if argv and argv[0] == "call":
        known, extra = _split_call(argv)
        if len(known) >= 2 and not known[1].startswith("-") and any(a in ("-h", "--help") for a in known):
            from opensmc.cli import call

            print(call.action_help(known[1]))
            return 0
        args = parser.parse_args(known)
    else:
        args = parser.parse_args(argv)
    if args.command == "server":
        from opensmc.cli import server

        return server.run(args)
    if args.command == "call":
        from opensmc.cli import call
        from opensmc.cli.credentials import load

        params = call.parse_pairs(extra)
        call.check_params(args.action, params)  # a typo is reported before credentials are even looked for
        return call.run(load(args.credentials, args.endpoint), args.action, extra)
    if args.command == "agent":
        from opensmc.cli import agent as agent_cli

        if not args.agent_command:
            raise errors.UsageError("give a subcommand: run, install or uninstall")
        return agent_cli.run_command(args)
    if args.command in ("jobs", "sources", "watch"):
        from opensmc.cli import views

        return views.run(args)
    if args.command == "image":
        from opensmc.cli import images as images_cli

        return images_cli.run(args)
    if args.command == "store":
        from opensmc.cli import store as store_cli

        return store_cli.run(args)
    if args.command == "demo":
        from opensmc.cli import demo

        return demo.run(args)
    if args.command == "admin":
        from opensmc.cli import admin

        return admin.run(args)
    if args.command == "db" and args.db_command == "upgrade":
        from opensmc.store.db import Database
        from opensmc.store.migrate import current, upgrade

        try:
            db = Database(args.database)
            upgrade(db)
        except Exception as exc:  # SQLAlchemy's errors name the URL problem well enough in one line
            raise CliError(f"cannot upgrade {_safe_url(args.database)}: {str(exc).splitlines()[0]}") from None
        print(f"schema at revision {current(db)}")
        return 0
    if args.command == "db" and args.db_command == "copy":
        return _db_copy(args.source, args.destination)
    parser.print_help()
    return errors.USAGE


def _db_copy(source: str, destination: str) -> int:
    from opensmc.store.copy import CopyError, copy_database
    from opensmc.store.db import Database

    dbs = []
    try:
        for url in (source, destination):
            try:
                dbs.append(Database(url))
            except Exception as exc:
                raise CliError(f"cannot open {_safe_url(url)}: {str(exc).splitlines()[0]}") from None
        try:
            copied = copy_database(dbs[0], dbs[1])
        except CopyError as exc:
            raise CliError(str(exc)) from None
        except Exception as exc:  # SQLAlchemy's first line names the problem (unreachable host, bad schema…)
            raise CliError(f"copy failed, nothing was written: {str(exc).splitlines()[0]}") from None
    finally:
        for db in dbs:
            db.dispose()
    print(json.dumps({"copied": copied, "to": _safe_url(destination)}, indent=2))
    return 0


def _safe_url(url: str) -> str:
    """The database URL without its password, for an error message."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "the database URL"


def _split_call(argv: list[str]) -> tuple[list[str], list[str]]:
    """Keep `call ACTION` and our own options for argparse; the rest are action parameters."""
    known = argv[:2]
    extra: list[str] = []
    rest = argv[2:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        name = arg.split("=", 1)[0]
        if name in ("--credentials", "--endpoint"):
            if "=" in arg:
                known.append(arg)
                i += 1
            else:
                known.extend(rest[i : i + 2])
                i += 2
        elif arg in ("-h", "--help"):
            known.append(arg)
            i += 1
        else:
            extra.append(arg)
            i += 1
    return known, extra


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
