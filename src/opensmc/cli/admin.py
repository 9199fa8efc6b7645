"""`opensmc admin`: accounts and AccessKeys, straight on the server's database.

An operator on the server machine (or anywhere that reaches its database and
holds its master key) runs these; there is no API for them, so a leaked
AccessKey cannot mint others. ``--data-dir`` finds the SQLite database and the
master key as ``opensmc server`` does; ``--database`` (or
``OPENSMC_DATABASE_URL``) points at PostgreSQL, with the master key from
``--data-dir`` or ``OPENSMC_MASTER_KEY``. Output is JSON on stdout.

Keys are looked up in the database on every request, by every server
process, so ``key disable`` and ``key delete`` take effect at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from opensmc.cli.credentials import default_data_dir
from opensmc.service import accounts
from opensmc.service.context import Services, Settings
from opensmc.store.db import Database, sqlite_url
from opensmc.store.migrate import upgrade
from opensmc.store.secretbox import SecretBox


def add_arguments(p: argparse.ArgumentParser) -> None:
    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data-dir", type=Path, default=None, help="the server's data dir (SQLite, master key)")
        q.add_argument("--database", default=None, help="database URL (default: SQLite in the data dir)")

    sub = p.add_subparsers(dest="admin_command", metavar="SUBCOMMAND")
    p_acc = sub.add_parser("account", help="accounts")
    acc_sub = p_acc.add_subparsers(dest="account_command", metavar="ACTION")
    p_create = acc_sub.add_parser("create", help="a new account with its first AccessKey (printed once)")
    p_create.add_argument("--name", required=True)
    common(p_create)
    common(acc_sub.add_parser("list", help="every account"))

    p_key = sub.add_parser("key", help="AccessKeys")
    key_sub = p_key.add_subparsers(dest="key_command", metavar="ACTION")
    k_create = key_sub.add_parser("create", help="a new AccessKey for an account (the secret is printed once)")
    k_create.add_argument("--account", required=True, help="account ID (acc-…)")
    k_create.add_argument(
        "--read-only", action="store_true", help="allow only Describe*/List* actions (policy ReadOnly)"
    )
    common(k_create)
    k_list = key_sub.add_parser("list", help="AccessKeys (never their secrets)")
    k_list.add_argument("--account", default=None, help="only this account's keys")
    common(k_list)
    for action, what in (("disable", "refuse the key from now on"), ("enable", "accept a disabled key again"),
                         ("delete", "remove the key for good")):  # fmt: skip
        k = key_sub.add_parser(action, help=what)
        k.add_argument("access_key_id")
        common(k)

    p_master = sub.add_parser("master-key", help="the master key that encrypts AccessKey secrets at rest")
    m_sub = p_master.add_subparsers(dest="master_command", metavar="ACTION")
    rot = m_sub.add_parser("rotate", help="re-encrypt every AccessKey secret under a new master key")
    common(rot)


def _services(args: argparse.Namespace) -> Services:
    data_dir: Path = (args.data_dir or default_data_dir()).resolve()
    url = args.database or os.environ.get("OPENSMC_DATABASE_URL")
    if url is None:
        if not (data_dir / "opensmc.db").exists():
            raise accounts.AdminError(f"no database in {data_dir}: give --data-dir DIR of a server, or --database URL")
        url = sqlite_url(data_dir / "opensmc.db")
    db = Database(url)
    upgrade(db)
    return Services(db=db, settings=Settings(data_dir=data_dir), secrets=SecretBox.from_env_or_file(data_dir))


def _print(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def run(args: argparse.Namespace) -> int:
    os.umask(0o077)  # a master key written here is the server's alone
    try:
        svc = _services(args)
        try:
            return _dispatch(svc, args)
        finally:
            svc.db.dispose()
    except accounts.AdminError as exc:
        print(f"opensmc admin: {exc}", file=sys.stderr)
        return 1


def _dispatch(svc: Services, args: argparse.Namespace) -> int:
    verb = getattr(args, "account_command", None) or getattr(args, "key_command", None)
    cmd: tuple[str, str] = (str(args.admin_command), str(verb or getattr(args, "master_command", None)))
    if cmd == ("account", "create"):
        pair = accounts.create_account(svc, args.name)
        _print({"account_id": pair.account_id, "access_key_id": pair.access_key_id,
                "access_key_secret": pair.access_key_secret})  # fmt: skip
    elif cmd == ("account", "list"):
        _print(accounts.list_accounts(svc))
    elif cmd == ("key", "create"):
        pair = accounts.new_key_pair(svc, args.account, accounts.READ_ONLY if args.read_only else accounts.FULL_ACCESS)
        _print({"account_id": pair.account_id, "access_key_id": pair.access_key_id,
                "access_key_secret": pair.access_key_secret,
                "policy": accounts.READ_ONLY if args.read_only else accounts.FULL_ACCESS})  # fmt: skip
    elif cmd == ("key", "list"):
        _print([k.as_json() for k in accounts.list_keys(svc, args.account)])
    elif cmd[0] == "key" and cmd[1] in ("disable", "enable"):
        enable = cmd[1] == "enable"
        accounts.set_key_enabled(svc, args.access_key_id, enable)
        _print({"access_key_id": args.access_key_id, "status": "Enabled" if enable else "Disabled"})
    elif cmd == ("key", "delete"):
        accounts.delete_key(svc, args.access_key_id)
        _print({"access_key_id": args.access_key_id, "deleted": True})
    elif cmd == ("master-key", "rotate"):
        return _rotate(svc)
    else:
        raise accounts.AdminError("say what to do: opensmc admin account|key|master-key … (see --help)")
    return 0


def _rotate(svc: Services) -> int:
    new_key = Fernet.generate_key()
    env = os.environ.get("OPENSMC_MASTER_KEY")
    path = svc.settings.data_dir / "master.key"
    tmp = path.with_name("master.key.new")
    if not env:
        # Written first, beside the old one: if the re-sealing fails, nothing is lost.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(new_key + b"\n")
            f.flush()
            os.fsync(f.fileno())
    try:
        count = accounts.rotate_master_key(svc, SecretBox(new_key))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if env:
        # The key lives in the environment: hand the new one to the operator to set everywhere.
        _print({"resealed": count, "new_master_key": new_key.decode(),
                "next": "set OPENSMC_MASTER_KEY to it for every server process, then restart them"})  # fmt: skip
    else:
        os.replace(tmp, path)
        _print({"resealed": count, "master_key_file": str(path),
                "next": "copy it to every server process sharing the database, then restart them"})  # fmt: skip
    return 0
