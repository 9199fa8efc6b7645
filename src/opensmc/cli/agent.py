"""`opensmc agent run|install|uninstall`: the agent on a source server, in the foreground or as a service."""

from __future__ import annotations

import argparse
from typing import Any

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
    from opensmc.agent.main import add_arguments as agent_arguments

    agent_arguments(p)


def check_disks(disks: list[str] | None) -> None:
    """A --disk must be a regular file or a block device (a usage error otherwise)."""
    from opensmc.agent.main import AgentUsageError
    from opensmc.agent.main import check_disks as check

    try:
        check(disks)
    except AgentUsageError as exc:
        raise UsageError(str(exc)) from None


def run_command(args: argparse.Namespace) -> int:
    if args.agent_command == "run":
        return run(args)
    from opensmc.cli import service

    if args.agent_command == "install":
        return service.install(args)
    return service.uninstall(args)


def run(args: argparse.Namespace) -> int:
    from opensmc.agent.main import AgentUsageError
    from opensmc.agent.main import run as run_agent

    try:
        return run_agent(args)
    except AgentUsageError as exc:
        raise UsageError(str(exc)) from None
