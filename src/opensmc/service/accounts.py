"""Accounts and AccessKeys: the first admin key, key lookup, nonce replay."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from opensmc.clock import new_id
from opensmc.domain.errors import AuthError
from opensmc.service.context import Caller, Services
from opensmc.store import accounts as q

CREDENTIALS_FILE = "admin-credentials.json"


@dataclass(frozen=True)
class KeyPair:
    account_id: str
    access_key_id: str
    access_key_secret: str


def new_key_pair(svc: Services, account_id: str) -> KeyPair:
    """Create an AccessKey pair for an account (the secret is only returned here)."""
    key_id = "LTAI" + secrets.token_hex(10)
    secret = secrets.token_urlsafe(24)
    with svc.db.begin() as conn:
        q.add_access_key(conn, key_id, account_id, svc.secrets.seal(secret), svc.clock())
    return KeyPair(account_id, key_id, secret)


def create_account(svc: Services, name: str) -> KeyPair:
    account_id = new_id("acc-")[:24]
    with svc.db.begin() as conn:
        q.create_account(conn, account_id, name, svc.clock())
    return new_key_pair(svc, account_id)


def bootstrap_admin(svc: Services, endpoint: str) -> Path | None:
    """On an empty database, create the first account and write its key to a 0600 file.

    Returns the file's path when it was written, None when accounts existed.
    """
    with svc.db.connect() as conn:
        if q.count_accounts(conn):
            _refresh_endpoint(svc.settings.data_dir / CREDENTIALS_FILE, endpoint)
            return None
    pair = create_account(svc, "admin")
    return write_credentials(svc.settings.data_dir / CREDENTIALS_FILE, pair, endpoint)


def write_credentials(path: Path, pair: KeyPair, endpoint: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(
            {
                "access_key_id": pair.access_key_id,
                "access_key_secret": pair.access_key_secret,
                "endpoint": endpoint,
            },
            f,
            indent=2,
        )
        f.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def _refresh_endpoint(path: Path, endpoint: str) -> None:
    """Keep the credentials file pointing at where the server listens now (it may have moved)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no file (another process's data dir, or removed by the operator): nothing to fix
    if isinstance(data, dict) and data.get("endpoint") != endpoint and data.get("access_key_id"):
        pair = KeyPair("", str(data["access_key_id"]), str(data.get("access_key_secret", "")))
        write_credentials(path, pair, endpoint)


def lookup_secret(svc: Services, key_id: str) -> tuple[str, str] | None:
    """(account_id, secret) for an enabled AccessKey, or None."""
    with svc.db.connect() as conn:
        found = q.get_access_key(conn, key_id)
    if found is None:
        return None
    account_id, sealed = found
    secret = svc.secrets.open(sealed)
    return (account_id, secret) if secret is not None else None


def check_nonce(svc: Services, caller: Caller, nonce: str) -> None:
    """Reject a nonce seen within the signature window (a replayed request)."""
    now = svc.clock()
    with svc.db.begin() as conn:
        if not q.remember_nonce(conn, caller.access_key_id, nonce, now):
            raise AuthError("SignatureNonceUsed", "Specified signature nonce was used already.")


def purge_nonces(svc: Services) -> int:
    with svc.db.begin() as conn:
        return q.forget_nonces_before(conn, svc.clock() - svc.settings.signature_window * 2)
