"""Where the CLI finds an AccessKey pair and the endpoint.

The AccessKey pair comes from the first of these that has one:

1. ``ALIBABA_CLOUD_ACCESS_KEY_ID`` and ``ALIBABA_CLOUD_ACCESS_KEY_SECRET``;
2. the credentials file named by ``--credentials`` or ``OPENSMC_CREDENTIALS``
   (when one is named, nothing else is read);
3. ``<data-dir>/admin-credentials.json`` as written by ``opensmc server``, the
   data dir being ``OPENSMC_DATA_DIR`` or ``./opensmc-data``;
4. ``~/.config/opensmc/credentials.json`` (``$XDG_CONFIG_HOME/opensmc/…``), same format;
5. the ``aliyun`` CLI's ``~/.aliyun/config.json``: its ``current`` profile, mode AK.

The endpoint comes from ``--endpoint``, ``OPENSMC_ENDPOINT``, or the first of the
files above that names one (the aliyun CLI's config has no OpenSMC endpoint).
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensmc.cli.errors import UsageError

DEFAULT_DATA_DIR = Path("opensmc-data")


class CredentialsError(UsageError):
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


def user_config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "opensmc" / "credentials.json"


def aliyun_config_file() -> Path:
    return Path.home() / ".aliyun" / "config.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"cannot read credentials file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"credentials file {path} does not hold a JSON object")
    return data


def _aliyun_profile(path: Path) -> dict[str, str] | None:
    """The aliyun CLI's current profile as our file format, if it is an AccessKey (AK) profile."""
    data = _read_json(path)
    if data is None:
        return None
    current = data.get("current") or "default"
    for profile in data.get("profiles") or []:
        if isinstance(profile, dict) and profile.get("name") == current:
            if str(profile.get("mode", "AK")) != "AK":
                return None  # StsToken, RamRoleArn…: nothing this client can sign with
            return {
                "access_key_id": str(profile.get("access_key_id") or ""),
                "access_key_secret": str(profile.get("access_key_secret") or ""),
            }
    return None


def load(credentials_file: str | None = None, endpoint: str | None = None) -> ClientCredentials:
    named = credentials_file or os.environ.get("OPENSMC_CREDENTIALS")
    candidates: list[tuple[Path, dict[str, Any] | None]] = []
    if named:
        path = Path(named).expanduser()
        data = _read_json(path)
        if data is None:
            raise CredentialsError(f"credentials file {path} does not exist")
        candidates.append((path, data))
    else:
        for path in (default_data_dir() / "admin-credentials.json", user_config_file()):
            candidates.append((path, _read_json(path)))
        candidates.append((aliyun_config_file(), _aliyun_profile(aliyun_config_file())))
    key_id = os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_ID")
    secret = os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
    if not (key_id and secret):
        key_id = secret = None
        for _path, data in candidates:
            if data and data.get("access_key_id") and data.get("access_key_secret"):
                key_id, secret = str(data["access_key_id"]), str(data["access_key_secret"])
                break
    ep = endpoint or os.environ.get("OPENSMC_ENDPOINT")
    if not ep:
        ep = next((str(d["endpoint"]) for _p, d in candidates if d and d.get("endpoint")), None)
    looked = ", ".join(str(p) for p, _d in candidates)
    if not key_id or not secret:
        raise CredentialsError(
            "no AccessKey: set ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET, "
            f"or pass --credentials FILE (looked in {looked})"
        )
    if not ep:
        raise CredentialsError(f"no endpoint: set OPENSMC_ENDPOINT or pass --endpoint (looked in {looked})")
    if "://" not in ep:
        ep = "http://" + ep
    return ClientCredentials(key_id, secret, ep.rstrip("/"))
