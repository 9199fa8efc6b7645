"""Encryption at rest for AccessKey secrets.

HMAC signatures can only be verified with the secret itself, so it cannot be
hashed like a password; it is encrypted with a Fernet key that lives outside
the database (``OPENSMC_MASTER_KEY`` or ``<data-dir>/master.key``, mode 0600).
Every server process on one database must share that key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken


class SecretBox:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)
        # A separate key for MACs, derived so that a MAC never reveals the encryption key.
        self._mac_key = hashlib.sha256(b"opensmc-mac:" + key).digest()

    @classmethod
    def from_env_or_file(cls, data_dir: Path) -> SecretBox:
        env = os.environ.get("OPENSMC_MASTER_KEY")
        if env:
            return cls(env.encode())
        path = data_dir / "master.key"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            key = Fernet.generate_key()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
        return cls(path.read_bytes().strip())

    def seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, sealed: str) -> str | None:
        """The secret, or None when it was sealed with another master key."""
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            return None

    def mac(self, message: str) -> str:
        """A keyed MAC of `message` (hex): credentials the server can re-derive instead of storing."""
        return hmac.new(self._mac_key, message.encode(), hashlib.sha256).hexdigest()
