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
from opensmc.service.keycache import CachedKey, cache_for
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


def lookup_secret(svc: Services, key_id: str, *, cached: bool = True) -> CachedKey | None:
    """(account_id, secret, keys_version) of an enabled AccessKey, or None.

    From this process's verified-key cache when ``cached`` and present; the
    caller must then pass the entry's version to :func:`check_nonce`, which
    refuses it if any key changed since (``service/keycache.py``).
    """
    cache = cache_for(svc.db)
    if cached:
        hit = cache.get(key_id)
        if hit is not None:
            return hit
    with svc.db.connect() as conn:
        version = q.get_keys_version(conn)
        found = q.get_access_key(conn, key_id)
    if found is None:
        cache.drop(key_id)
        return None
    account_id, sealed = found
    secret = svc.secrets.open(sealed)
    if secret is None:
        return None
    entry = CachedKey(account_id, secret, version)
    cache.put(key_id, entry)
    return entry


def check_nonce(svc: Services, caller: Caller, nonce: str, *, key_version: int | None = None) -> bool:
    """Reject a nonce seen within the signature window (a replayed request).

    With ``key_version`` (the cached key's), returns False without recording the
    nonce when AccessKeys changed since: verify the request again from the database.
    """
    now = svc.clock()
    with svc.db.begin() as conn:
        if key_version is not None and q.get_keys_version(conn) != key_version:
            cache_for(svc.db).drop(caller.access_key_id)
            return False
        if not q.remember_nonce(conn, caller.access_key_id, nonce, now):
            raise AuthError("SignatureNonceUsed", "Specified signature nonce was used already.")
    return True


def purge_nonces(svc: Services) -> int:
    with svc.db.begin() as conn:
        return q.forget_nonces_before(conn, svc.clock() - svc.settings.signature_window * 2)
