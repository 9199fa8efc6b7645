"""`opensmc call ACTION --Param value …`: any SMC action, signed, JSON printed.

Parameters are written as on the wire, repeat lists included
(`--DataDisk.1.Size 40`, `--Tag.1.Key env`). The request is signed with
ACS3-HMAC-SHA256, as the Tea SDK does.
"""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import urlsplit

import httpx

from opensmc import API_VERSION
from opensmc.cli.credentials import ClientCredentials, tls_verify
from opensmc.signer import sign_acs3


class UsageError(Exception):
    pass


def parse_pairs(args: list[str]) -> dict[str, str]:
    """`--Name value` and `--Name=value` pairs, in order."""
    params: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise UsageError(f"expected --ParamName, got {arg!r}")
        name = arg[2:]
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise UsageError(f"--{name} needs a value")
            value = args[i + 1]
            i += 2
        params[name] = value
    return params


def invoke(creds: ClientCredentials, action: str, params: dict[str, str], timeout: float = 60.0) -> tuple[int, Any]:
    """(HTTP status, decoded JSON body) of one signed call."""
    url = urlsplit(creds.endpoint)
    host = url.netloc
    query, headers = sign_acs3("POST", host, action, API_VERSION, params, creds.access_key_id, creds.access_key_secret)
    response = httpx.post(f"{url.scheme}://{host}/?{query}", headers=headers, timeout=timeout, verify=tls_verify())
    try:
        body = response.json()
    except ValueError:
        body = {"Code": "InvalidResponse", "Message": response.text[:500], "RequestId": ""}
    return response.status_code, body


def run(creds: ClientCredentials, action: str, args: list[str]) -> int:
    params = parse_pairs(args)
    try:
        status, body = invoke(creds, action, params)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {creds.endpoint}: {exc}", file=sys.stderr)
        return 2
    if status >= 400:
        print(f"Code: {body.get('Code', '')}", file=sys.stderr)
        print(f"Message: {body.get('Message', '')}", file=sys.stderr)
        print(f"RequestId: {body.get('RequestId', '')}", file=sys.stderr)
        print(f"HTTP status: {status}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2, ensure_ascii=False))
    return 0
