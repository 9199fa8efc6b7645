"""`opensmc agent install|uninstall`: the agent as a systemd service.

``install`` writes three things and then enables and starts the unit:

- ``/etc/systemd/system/opensmc-agent.service``, hardened (see docs/operations.md);
- ``/etc/opensmc/agent.env`` (mode 0600): the activation code or AccessKey. It is
  kept out of the unit and off the command line, where ``systemctl cat`` and
  ``ps`` would show it to every user; the agent reads it from its environment;
- the state directory ``/var/lib/opensmc-agent`` is made by systemd itself
  (``StateDirectory=``), mode 0700: the agent keeps its identity there.

Once registered the agent no longer needs the activation code, but the file
stays so that a wiped state directory can register again while the code is valid.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from opensmc.cli.agent import check_disks
from opensmc.cli.errors import CliError, UsageError

UNIT_NAME = "opensmc-agent.service"
UNIT_DIR = Path("/etc/systemd/system")
ENV_FILE = Path("/etc/opensmc/agent.env")
STATE_DIR = Path("/var/lib/opensmc-agent")


def add_install_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="the OpenSMC server URL, e.g. https://smc.example:8080")
    p.add_argument("--token-id", default=None, help="activation code ID (at-…) from CreateAccessToken")
    p.add_argument("--token-code", default=None, help="activation code from CreateAccessToken")
    p.add_argument("--access-key-id", default=None, help="register with an AccessKey instead of an activation code")
    p.add_argument("--access-key-secret", default=None, help="the AccessKey secret")
    p.add_argument("--disk", action="append", default=None, help="a disk to migrate instead of discovered disks")
    p.add_argument("--ca-cert", type=Path, default=None, help="PEM CA bundle to trust for the server's certificate")
    p.add_argument("--unit-dir", type=Path, default=UNIT_DIR, help=f"where the unit goes (default {UNIT_DIR})")
    p.add_argument("--env-file", type=Path, default=ENV_FILE, help=f"where the secrets go (default {ENV_FILE})")
    p.add_argument("--print", action="store_true", help="print the unit and write nothing")
    p.add_argument("--no-start", action="store_true", help="write the files but do not run systemctl")


def add_uninstall_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unit-dir", type=Path, default=UNIT_DIR, help=f"where the unit is (default {UNIT_DIR})")
    p.add_argument("--env-file", type=Path, default=ENV_FILE, help=f"the secrets file to remove (default {ENV_FILE})")
    p.add_argument("--purge", action="store_true", help=f"also remove the agent's identity in {STATE_DIR}")
    p.add_argument("--no-stop", action="store_true", help="remove the files but do not run systemctl")


def exec_quote(arg: str) -> str:
    """One ExecStart= word: quoted when needed, with systemd's specifiers (%) and variables ($) kept literal."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if escaped and not any(c in escaped for c in ' \t"\'\\;'):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def agent_command(server: str, disks: list[str] | None, ca_cert: Path | None) -> list[str]:
    # `python -m` with this interpreter's absolute path: the unit runs the same installation
    # that wrote it, whatever PATH systemd gives the service.
    cmd = [sys.executable, "-m", "opensmc.cli.main", "agent", "run", "--server", server]
    cmd += ["--state-dir", str(STATE_DIR), "--log-format", "json"]
    for disk in disks or ():
        cmd += ["--disk", str(Path(disk).resolve())]
    if ca_cert:
        cmd += ["--ca-cert", str(ca_cert.resolve())]
    return cmd


def agent_unit(command: list[str], env_file: Path) -> str:
    return f"""# Written by `opensmc agent install`; remove with `opensmc agent uninstall`.
# See docs/operations.md in the OpenSMC repository ("The agent as a service").
[Unit]
Description=OpenSMC agent: registers this server as a migration source and sends its disks
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart={" ".join(exec_quote(a) for a in command)}
EnvironmentFile={env_file}
Restart=on-failure
RestartSec=5s
# the agent's identity; systemd creates it (0700) and keeps it across restarts
StateDirectory=opensmc-agent
StateDirectoryMode=0700
UMask=0077
# Hardening. The agent runs as root because it reads whole block devices; everything else is
# taken away: it writes nowhere but its state directory, and cannot gain privileges.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
LockPersonality=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""


def env_file_text(args: argparse.Namespace) -> str:
    lines = ["# Secrets for opensmc-agent.service (mode 0600): read by systemd, not shown by `systemctl cat`."]
    pairs = (
        ("OPENSMC_TOKEN_ID", args.token_id),
        ("OPENSMC_TOKEN_CODE", args.token_code),
        ("ALIBABA_CLOUD_ACCESS_KEY_ID", args.access_key_id),
        ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", args.access_key_secret),
    )
    for name, value in pairs:
        if value:
            # Activation codes and AccessKeys are plain tokens; anything else would need systemd's quoting rules.
            if any(c.isspace() or c in "\"'\\$" for c in value):
                raise UsageError(f"the value for {name} holds spaces, quotes, backslashes or $")
            lines.append(f"{name}={value}")
    return "\n".join(lines) + "\n"


def _systemctl(*args: str) -> None:
    try:
        subprocess.run(["systemctl", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise UsageError("systemctl not found: is this a systemd system? (--no-start writes the files only)") from None
    except subprocess.CalledProcessError as exc:
        raise CliError(f"systemctl {' '.join(args)} failed: {(exc.stderr or exc.stdout).strip()}") from None


def install(args: argparse.Namespace) -> int:
    has_token = bool(args.token_id and args.token_code)
    has_key = bool(args.access_key_id and args.access_key_secret)
    if has_token == has_key:
        raise UsageError("give either --token-id and --token-code, or --access-key-id and --access-key-secret")
    if "://" not in args.server:
        raise UsageError(f"--server {args.server!r}: give a URL, e.g. http://10.0.0.5:8080")
    check_disks(args.disk)
    unit = agent_unit(agent_command(args.server, args.disk, args.ca_cert), args.env_file)
    if args.print:
        print(unit, end="")
        return 0
    if not args.no_start and shutil.which("systemctl") is None:
        raise UsageError("systemctl not found: is this a systemd system? (--no-start writes the files only)")
    try:
        _write(args, unit)
    except PermissionError as exc:
        hint = "run it as root, or give --unit-dir and --env-file"
        raise UsageError(f"{exc.filename}: permission denied ({hint})") from None
    if args.no_start:
        print(f"start it with: systemctl daemon-reload && systemctl enable --now {UNIT_NAME}")
        return 0
    _systemctl("daemon-reload")
    _systemctl("enable", "--now", UNIT_NAME)
    print(f"{UNIT_NAME} enabled and started; follow it with: journalctl -u {UNIT_NAME} -f")
    return 0


def _write(args: argparse.Namespace, unit: str) -> None:
    args.env_file.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(args.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT: force it
        f.write(env_file_text(args))
    unit_path = args.unit_dir / UNIT_NAME
    args.unit_dir.mkdir(parents=True, exist_ok=True)
    unit_path.write_text(unit)
    unit_path.chmod(0o644)
    print(f"wrote {unit_path} and {args.env_file} (mode 0600)")


def uninstall(args: argparse.Namespace) -> int:
    unit_path = args.unit_dir / UNIT_NAME
    if not unit_path.exists() and not args.env_file.exists():
        raise UsageError(f"{unit_path} is not installed")
    if not args.no_stop:
        _systemctl("disable", "--now", UNIT_NAME)
    unit_path.unlink(missing_ok=True)
    args.env_file.unlink(missing_ok=True)
    if not args.no_stop:
        _systemctl("daemon-reload")
    removed = [str(unit_path), str(args.env_file)]
    if args.purge and STATE_DIR.exists():
        shutil.rmtree(STATE_DIR)
        removed.append(str(STATE_DIR))
    print("removed " + ", ".join(removed))
    return 0
