"""Accounts and AccessKeys: the first admin key, key lookup, nonce replay."""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from opensmc.clock import iso, new_id
from opensmc.domain.errors import AuthError, ServerDiskFull
from opensmc.service.context import Caller, Services
from opensmc.service.keycache import CachedKey, cache_for
from opensmc.store import accounts as q
from opensmc.store.secretbox import SecretBox

CREDENTIALS_FILE = "admin-credentials.json"


@dataclass(frozen=True)
class KeyPair:
    account_id: str
    access_key_id: str
    access_key_secret: str


FULL_ACCESS = "FullAccess"
#: Describe* and List* actions only (a RAM-style read-only policy)
READ_ONLY = "ReadOnly"
POLICIES = (FULL_ACCESS, READ_ONLY)
READ_PREFIXES = ("Describe", "List")


class AdminError(Exception):
    """An operator command that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class KeyInfo:
    access_key_id: str
    account_id: str
    enabled: bool
    policy: str
    created_at: str

    def as_json(self) -> dict[str, object]:
        return {"access_key_id": self.access_key_id, "account_id": self.account_id,
                "status": "Enabled" if self.enabled else "Disabled", "policy": self.policy,
                "created_at": self.created_at}  # fmt: skip


def new_key_pair(svc: Services, account_id: str, policy: str = FULL_ACCESS) -> KeyPair:
    """Create an AccessKey pair for an account (the secret is only returned here)."""
    if policy not in POLICIES:
        raise AdminError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
    key_id = "LTAI" + secrets.token_hex(10)
    secret = secrets.token_urlsafe(24)
    with svc.db.begin() as conn:
        if q.get_account(conn, account_id) is None:
            raise AdminError(f"no account {account_id}; see `opensmc admin key list` for the accounts' IDs")
        q.add_access_key(conn, key_id, account_id, svc.secrets.seal(secret), svc.clock(), policy)
    return KeyPair(account_id, key_id, secret)


def create_account(svc: Services, name: str) -> KeyPair:
    if not 1 <= len(name) <= 128:
        raise AdminError("an account name is 1 to 128 characters")
    account_id = new_id("acc-")[:24]
    with svc.db.begin() as conn:
        q.create_account(conn, account_id, name, svc.clock())
    return new_key_pair(svc, account_id)


def list_accounts(svc: Services) -> list[dict[str, str]]:
    with svc.db.connect() as conn:
        rows = q.list_accounts(conn)
    return [{"account_id": r.id, "name": r.name, "created_at": iso(r.created_at)} for r in rows]


def list_keys(svc: Services, account_id: str | None = None) -> list[KeyInfo]:
    with svc.db.connect() as conn:
        rows = q.list_access_keys(conn, account_id)
    return [KeyInfo(r.id, r.account_id, bool(r.enabled), r.policy, iso(r.created_at)) for r in rows]


def set_key_enabled(svc: Services, key_id: str, enabled: bool) -> None:
    """Enable or disable a key; every server process refuses a disabled key from its next request."""
    with svc.db.begin() as conn:
        if not q.set_key_enabled(conn, key_id, enabled):
            raise AdminError(f"no AccessKey {key_id}; see `opensmc admin key list`")


def delete_key(svc: Services, key_id: str) -> None:
    with svc.db.begin() as conn:
        if not q.delete_access_key(conn, key_id):
            raise AdminError(f"no AccessKey {key_id}; see `opensmc admin key list`")


def rotate_master_key(svc: Services, new: SecretBox) -> int:
    """Re-seal every AccessKey secret under ``new``, in one transaction; the number re-sealed.

    A secret the current master key cannot open is an error (nothing is
    changed): rotating with the wrong key would lose every key.
    """
    with svc.db.begin() as conn:
        sealed = q.all_sealed_secrets(conn)
        for key_id, enc in sealed:
            secret = svc.secrets.open(enc)
            if secret is None:
                raise AdminError(
                    f"the current master key cannot open the secret of {key_id}: is this the database's master key?"
                )
            q.reseal(conn, key_id, new.seal(secret))
    return len(sealed)


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
    """(account_id, secret, keys_version, policy) of an enabled AccessKey, or None.

    From this process's verified-key cache when ``cached`` and present; the
    caller must then pass the entry's version to :func:`check_nonce`, which
    refuses it if any key changed since (``service/keycache.py``): a key
    disabled or deleted in any process is refused at the next request.
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
    account_id, sealed, policy = found
    secret = svc.secrets.open(sealed)
    if secret is None:
        return None
    entry = CachedKey(account_id, secret, version, policy)
    cache.put(key_id, entry)
    return entry


def check_policy(caller: Caller, action: str) -> None:
    """Refuse an action the caller's key policy does not allow (``Forbidden.RAM``, 403)."""
    if caller.read_only and not action.startswith(READ_PREFIXES):
        raise AuthError(
            "Forbidden.RAM",
            f"The AccessKey {caller.access_key_id} has the {READ_ONLY} policy, which allows only Describe* and "
            f"List* actions; {action} is not allowed. Use a key with full access.",
            403,
        )


def check_nonce(svc: Services, caller: Caller, nonce: str, *, key_version: int | None = None) -> bool:
    """Reject a nonce seen within the signature window (a replayed request).

    With ``key_version`` (the cached key's), returns False without recording the
    nonce when AccessKeys changed since: verify the request again from the database.
    """
    now = svc.clock()
    if _nonce_seen_in_memory(caller.access_key_id, nonce, now, svc, remember=False):
        raise NONCE_USED
    try:
        with svc.db.begin() as conn:
            if key_version is not None and q.get_keys_version(conn) != key_version:
                cache_for(svc.db).drop(caller.access_key_id)
                return False
            if not q.remember_nonce(conn, caller.access_key_id, nonce, now):
                raise NONCE_USED
    except ServerDiskFull:
        # The database's disk is full, so it cannot record the nonce: remember it in this
        # process for the signature window instead, so that reads keep working (a write
        # fails on its own, with the same clear error).
        with svc.db.connect() as conn:
            if key_version is not None and q.get_keys_version(conn) != key_version:
                cache_for(svc.db).drop(caller.access_key_id)
                return False
            if q.nonce_used(conn, caller.access_key_id, nonce):
                raise NONCE_USED from None
        if _nonce_seen_in_memory(caller.access_key_id, nonce, now, svc, remember=True):
            raise NONCE_USED from None
    return True


@dataclass(frozen=True, slots=True)
class NonceClaim:
    """One request's nonce, for :func:`record_nonces`; ``key_version`` as in :func:`check_nonce`."""

    access_key_id: str
    nonce: str
    key_version: int | None


#: claims per call of :func:`record_nonces` at most
NONCE_BATCH_MAX = q.NONCE_BATCH_MAX
#: what :func:`record_nonces` says of each claim
RECORDED = "recorded"  #: the nonce is new and now recorded: the request may run
REPLAYED = "replayed"  #: seen before (in any process, or earlier in the same batch): SignatureNonceUsed
STALE = "stale"  #: AccessKeys changed since the key was cached; not recorded: verify again from the database
IN_MEMORY = "in-memory"  #: the database cannot take writes (disk full): check it alone with check_nonce


def record_nonces(svc: Services, claims: Sequence[NonceClaim]) -> list[str]:
    """Record the nonces of many requests in one transaction (group commit); one outcome per claim.

    The same rule as :func:`check_nonce`, for a batch: the ``keys_version`` row
    is read in the transaction that inserts the nonces, a claim made with an
    older version is not recorded (``STALE``), and the primary key of
    ``nonces`` decides between this batch and every other process. A request
    runs only once its claim is ``RECORDED``, after the commit. When nonces
    are kept in memory (the database's disk was full) every claim is
    ``IN_MEMORY``: the caller checks each one with :func:`check_nonce`.
    """
    if _memory_nonces:
        return [IN_MEMORY] * len(claims)
    outcomes = [REPLAYED] * len(claims)
    stale: set[str] = set()
    first: dict[tuple[str, str], int] = {}
    for i, c in enumerate(claims):
        if (c.access_key_id, c.nonce) not in first:  # a second one in the batch is a replay
            first[(c.access_key_id, c.nonce)] = i
    try:
        version, inserted = q.claim_nonces(
            svc.db, [(k, n, claims[i].key_version) for (k, n), i in first.items()], svc.clock()
        )
    except ServerDiskFull:
        return [IN_MEMORY] * len(claims)
    for i, c in enumerate(claims):
        if c.key_version is not None and c.key_version != version:
            outcomes[i] = STALE
            stale.add(c.access_key_id)
    for pair, i in first.items():
        if pair in inserted:
            outcomes[i] = RECORDED
    cache = cache_for(svc.db)
    for key_id in stale:
        cache.drop(key_id)
    return outcomes


NONCE_USED = AuthError("SignatureNonceUsed", "Specified signature nonce was used already.")
log = logging.getLogger("opensmc.api")
#: nonces this process could not record in a full database: (key id, nonce) -> when
_memory_nonces: dict[tuple[str, str], datetime] = {}
_memory_lock = threading.Lock()
_MEMORY_MAX = 200_000


def _nonce_seen_in_memory(key_id: str, nonce: str, now: datetime, svc: Services, *, remember: bool) -> bool:
    """Was this nonce admitted while the database was full? With ``remember``, record it if not."""
    if not _memory_nonces and not remember:
        return False  # the usual case, without the lock: the database records nonces
    with _memory_lock:
        horizon = now - svc.settings.signature_window * 2
        for k in [k for k, t in _memory_nonces.items() if t < horizon][:1000]:
            del _memory_nonces[k]
        if (key_id, nonce) in _memory_nonces:
            return True
        if remember:
            if len(_memory_nonces) >= _MEMORY_MAX:
                raise ServerDiskFull(
                    "The server's disk is full and it has admitted as many requests as it can remember "
                    "without it: free space on the server's disk and try again."
                )
            if not _memory_nonces:
                log.warning("the database cannot record signature nonces (disk full): keeping them in memory")
            _memory_nonces[(key_id, nonce)] = now
        return False


def purge_nonces(svc: Services) -> int:
    with svc.db.begin() as conn:
        return q.forget_nonces_before(conn, svc.clock() - svc.settings.signature_window * 2)
