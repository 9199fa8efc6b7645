"""Where the CLI finds an AccessKey pair and the endpoint.

Order: ``ALIBABA_CLOUD_ACCESS_KEY_ID``/``ALIBABA_CLOUD_ACCESS_KEY_SECRET`` and
``OPENSMC_ENDPOINT`` from the environment; then a credentials file (``--credentials``,
``OPENSMC_CREDENTIALS``, or ``<data-dir>/admin-credentials.json`` with the data dir
from ``OPENSMC_DATA_DIR`` or ``./opensmc-data``), as written by ``opensmc server``.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path("opensmc-data")


class CredentialsError(Exception):
    """No usable credentials; the message says where they were looked for."""


@dataclass(frozen=True)
class ClientCredentials:
    access_key_id: str
    access_key_secret: str
    endpoint: str


def tls_verify() -> ssl.SSLContext | bool:
    """What to trust for an https endpoint: ``OPENSMC_CA_CERT`` (a PEM bundle) or the system store."""
    bundle = os.environ.get("OPENSMC_CA_CERT")
    return ssl.create_default_context(cafile=bundle) if bundle else True


def default_data_dir() -> Path:
    return Path(os.environ.get("OPENSMC_DATA_DIR", DEFAULT_DATA_DIR))


def load(credentials_file: str | None = None, endpoint: str | None = None) -> ClientCredentials:
    env_id = os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_ID")
    env_secret = os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
    env_endpoint = endpoint or os.environ.get("OPENSMC_ENDPOINT")
    path = Path(
        credentials_file or os.environ.get("OPENSMC_CREDENTIALS") or default_data_dir() / "admin-credentials.json"
    )
    file_data: dict[str, str] = {}
    if path.exists():
        try:
            file_data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CredentialsError(f"cannot read credentials file {path}: {exc}") from None
    key_id = env_id or file_data.get("access_key_id")
    secret = env_secret or file_data.get("access_key_secret")
    ep = env_endpoint or file_data.get("endpoint")
    if not key_id or not secret:
        raise CredentialsError(
            "no AccessKey: set ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET, "
            f"or pass --credentials FILE (looked for {path})"
        )
    if not ep:
        raise CredentialsError(f"no endpoint: set OPENSMC_ENDPOINT or pass --endpoint (looked in {path})")
    if "://" not in ep:
        ep = "http://" + ep
    return ClientCredentials(key_id, secret, ep.rstrip("/"))
