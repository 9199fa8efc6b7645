"""The SMC client `opensmc demo` uses: the official Tea SDK when installed, else our signer.

The demo is meant to show that the official SDK works against OpenSMC
unchanged, so it prefers ``alibabacloud-smc20190601``. Either way
:meth:`SmcClient.call` takes wire parameters and returns the wire-shaped
response body (the SDK's ``body.to_map()``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from opensmc.cli.credentials import ClientCredentials


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to look at."""


# Tea SDK method and request model per action, and how its fields are named.
_SDK = {
    "CreateAccessToken": ("create_access_token", "CreateAccessTokenRequest"),
    "DescribeSourceServers": ("describe_source_servers", "DescribeSourceServersRequest"),
    "CreateReplicationJob": ("create_replication_job", "CreateReplicationJobRequest"),
    "StartReplicationJob": ("start_replication_job", "StartReplicationJobRequest"),
    "DescribeReplicationJobs": ("describe_replication_jobs", "DescribeReplicationJobsRequest"),
}


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


class SmcClient:
    def __init__(self, creds: ClientCredentials) -> None:
        self.creds = creds
        self._sdk: Any = None
        self._models: Any = None
        try:
            from alibabacloud_smc20190601 import models
            from alibabacloud_smc20190601.client import Client
            from alibabacloud_tea_openapi import models as open_api_models
        except ImportError:
            self.kind = "OpenSMC's own request signer (for the official SDK: pip install alibabacloud-smc20190601)"
            return
        config = open_api_models.Config(
            access_key_id=creds.access_key_id,
            access_key_secret=creds.access_key_secret,
            endpoint=urlsplit(creds.endpoint).netloc,
            protocol="http",
        )
        self._sdk = Client(config)
        self._models = models
        self.kind = "the official Alibaba Cloud SDK (alibabacloud-smc20190601, ACS3-HMAC-SHA256)"

    def call(self, action: str, params: dict[str, str]) -> dict[str, Any]:
        if self._sdk is None:
            return self._call_signed(action, params)
        method, model = _SDK[action]
        fields: dict[str, Any] = {}
        for key, value in params.items():
            name, _, index = key.partition(".")
            if index:  # a repeat list such as JobId.1
                fields.setdefault(_snake(name), []).append(value)
            elif value in ("true", "false"):
                fields[_snake(name)] = value == "true"
            elif value.isdigit() and name != "Name":
                fields[_snake(name)] = int(value)
            else:
                fields[_snake(name)] = value
        request = getattr(self._models, model)(**fields)
        try:
            response = getattr(self._sdk, method)(request)
        except Exception as exc:  # Tea raises TeaException (code, message) or network errors
            code = getattr(exc, "code", "")
            message = getattr(exc, "message", str(exc))
            raise DemoError(f"{action} failed: {code} {message}") from None
        return dict(response.body.to_map())

    def _call_signed(self, action: str, params: dict[str, str]) -> dict[str, Any]:
        import httpx

        from opensmc.cli.call import invoke
        from opensmc.cli.errors import UnreachableError

        try:
            status, body = invoke(self.creds, action, params)
        except (httpx.HTTPError, UnreachableError) as exc:
            raise DemoError(f"{action} failed: cannot reach {self.creds.endpoint}: {exc}") from None
        if status >= 400:
            raise DemoError(f"{action} failed: {body.get('Code')}: {body.get('Message')}")
        return dict(body)
