"""The `opensmc` command: server, agent, call, and friendly views."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from opensmc import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opensmc", description="OpenSMC: a self-hosted Server Migration Center")
    parser.add_argument("--version", action="version", version=f"opensmc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from opensmc.cli import server

    p_server = sub.add_parser("server", help="run the API, agent API and orchestrator")
    server.add_arguments(p_server)

    p_call = sub.add_parser(
        "call",
        help="call any SMC action, signed: opensmc call ACTION --Param value …",
        description="Call any SMC action. Parameters as on the wire: --JobId j-… --DataDisk.1.Size 40",
    )
    p_call.add_argument("action")
    p_call.add_argument(
        "--credentials", default=None, help="credentials file (default: <data-dir>/admin-credentials.json)"
    )
    p_call.add_argument("--endpoint", default=None, help="API endpoint, e.g. http://127.0.0.1:8080")

    p_agent = sub.add_parser("agent", help="the agent that runs on a source server")
    agent_sub = p_agent.add_subparsers(dest="agent_command", metavar="SUBCOMMAND")
    from opensmc.cli import agent as agent_cli

    agent_cli.add_arguments(agent_sub.add_parser("run", help="register this machine and keep heartbeating"))

    from opensmc.cli import images as images_cli
    from opensmc.cli import views

    views.add_arguments(sub)

    images_cli.add_arguments(sub.add_parser("image", help="list, show, export and verify migrated images"))

    from opensmc.cli import demo

    demo.add_arguments(sub.add_parser("demo", help="a complete migration on this machine, for a first look"))

    from opensmc.cli import admin

    admin.add_arguments(sub.add_parser("admin", help="accounts, AccessKeys and the master key (on the server)"))

    p_db = sub.add_parser("db", help="database maintenance")
    db_sub = p_db.add_subparsers(dest="db_command", metavar="SUBCOMMAND")
    p_up = db_sub.add_parser("upgrade", help="apply schema migrations")
    p_up.add_argument("--database", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `call` takes free-form --Param pairs, which argparse cannot know in advance.
    extra: list[str] = []
    if argv and argv[0] == "call":
        known, extra = _split_call(argv)
        args = parser.parse_args(known)
    else:
        args = parser.parse_args(argv)
    if args.command == "server":
        from opensmc.cli import server

        return server.run(args)
    if args.command == "call":
        from opensmc.cli import call
        from opensmc.cli.credentials import CredentialsError, load

        try:
            creds = load(args.credentials, args.endpoint)
            return call.run(creds, args.action, extra)
        except (CredentialsError, call.UsageError) as exc:
            print(f"opensmc call: {exc}", file=sys.stderr)
            return 2
    if args.command == "agent" and args.agent_command == "run":
        from opensmc.cli import agent as agent_cli

        return agent_cli.run(args)
    if args.command in ("jobs", "sources", "watch"):
        from opensmc.cli import views

        return views.run(args)
    if args.command == "image":
        from opensmc.cli import images as images_cli

        return images_cli.run(args)
    if args.command == "demo":
        from opensmc.cli import demo

        return demo.run(args)
    if args.command == "admin":
        from opensmc.cli import admin

        return admin.run(args)
    if args.command == "db" and args.db_command == "upgrade":
        from opensmc.store.db import Database
        from opensmc.store.migrate import current, upgrade

        db = Database(args.database)
        upgrade(db)
        print(f"schema at revision {current(db)}")
        return 0
    parser.print_help()
    return 2


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
