"""`opensmc call ACTION --Param value …`: any SMC action, signed, JSON printed.

Parameters are written as on the wire, repeat lists included
(`--DataDisk.1.Size 40`, `--Tag.1.Key env`). The request is signed with
ACS3-HMAC-SHA256, as the Tea SDK does. Actions and their parameters come from
the server's own action registry (through `action_params`, its generated
copy), so a misspelt action or parameter is refused here, with a suggestion,
instead of being sent (the server ignores parameters it does not read, as SMC
does, which would hide the typo).
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from typing import Any
from urllib.parse import urlsplit

import httpx

from opensmc import API_VERSION
from opensmc.cli.credentials import ClientCredentials, tls_verify
from opensmc.cli.errors import ApiError, UnreachableError, UsageError
from opensmc.signer import sign_acs3

__all__ = ["UsageError", "action_help", "actions_epilog", "call_ok", "check_params", "invoke", "parse_pairs", "run"]


def _actions() -> dict[str, tuple[str, ...]]:
    # The generated copy, not the registry itself: importing that pulls in SQLAlchemy and every
    # service, a second of CPU for each `opensmc call`.
    from opensmc.cli.action_params import PARAMS

    return PARAMS


def _closest(word: str, choices: list[str]) -> str | None:
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:  # --JobID for JobId: only the case is wrong
        return lowered[word.lower()]
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


def _suggest(word: str, choices: list[str]) -> str:
    found = _closest(word, choices)
    return f"; did you mean {found}?" if found else ""


def _wire(pattern: str) -> str:
    """``JobId.N`` → ``JobId.1``: a suggestion the user can paste."""
    return ".".join("1" if part in ("N", "M") else part for part in pattern.split("."))


def check_action(action: str) -> tuple[str, ...]:
    """The parameters of ``action``; UsageError (with a suggestion) for an unknown one."""
    table = _actions()
    if action not in table:
        raise UsageError(
            f"unknown action {action!r}{_suggest(action, list(table))} (`opensmc call --help` lists every action)"
        )
    return table[action]


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _pattern(name: str) -> str:
    """``DataDisk.2.Part.1.Device`` → ``DataDisk.N.Part.M.Device``, the registry's spelling of repeat lists."""
    letters = iter("NM")
    return _INDEX.sub(lambda _m: next(letters, "K"), name)


def check_params(action: str, params: dict[str, str]) -> None:
    known = check_action(action)
    for name in params:
        if _pattern(name) not in known:
            # `--JobID j-1` for a list parameter `JobId.N` is still JobId: compare without the index part.
            bare = {p.split(".N", 1)[0] if p.endswith(".N") else p: p for p in known}
            found = _closest(_pattern(name), list(known)) or (
                bare[hit] if (hit := _closest(name, list(bare))) else None
            )
            hint = f"did you mean --{_wire(found)}?" if found else f"`opensmc call {action} --help` lists them"
            raise UsageError(f"{action} has no parameter --{name}; {hint}")


def action_help(action: str) -> str:
    params = check_action(action)
    lines = [f"usage: opensmc call {action} [--Param value …] [--credentials FILE] [--endpoint URL]", ""]
    lines.append(f"Parameters of {action} (N, M: repeat-list numbers from 1):")
    lines += [f"  --{p}" for p in params] or ["  (none)"]
    return "\n".join(lines)


def actions_epilog() -> str:
    names = list(_actions())
    rows = [", ".join(names[i : i + 4]) for i in range(0, len(names), 4)]
    return (
        "examples:\n"
        "  opensmc call DescribeSourceServers\n"
        "  opensmc call CreateReplicationJob --RegionId local --SourceId s-… --Name first\n"
        "  opensmc call StartReplicationJob --JobId j-…\n"
        "  opensmc call CreateReplicationJob --help     # the parameters of one action\n\n"
        "actions:\n  " + ",\n  ".join(rows)
    )


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
    """(HTTP status, decoded JSON body) of one signed call; UnreachableError when no answer came."""
    url = urlsplit(creds.endpoint)
    host = url.netloc
    query, headers = sign_acs3("POST", host, action, API_VERSION, params, creds.access_key_id, creds.access_key_secret)
    try:
        response = httpx.post(f"{url.scheme}://{host}/?{query}", headers=headers, timeout=timeout, verify=tls_verify())
    except httpx.TransportError as exc:
        raise UnreachableError(f"cannot reach {creds.endpoint}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = {"Code": "InvalidResponse", "Message": response.text[:500], "RequestId": ""}
    return response.status_code, body


def call_ok(creds: ClientCredentials, action: str, params: dict[str, str]) -> dict[str, Any]:
    """The body of a successful call; ApiError for an SMC error answer."""
    status, body = invoke(creds, action, params)
    if status >= 400 or not isinstance(body, dict):
        raise ApiError(status, body if isinstance(body, dict) else {})
    return body


def run(creds: ClientCredentials, action: str, args: list[str]) -> int:
    params = parse_pairs(args)
    check_params(action, params)
    body = call_ok(creds, action, params)
    print(json.dumps(body, indent=2, ensure_ascii=False))
    if action == "CreateAccessToken" and body.get("AccessTokenId") and body.get("AccessTokenCode"):
        from opensmc.api.agent_dist import install_command

        # On stderr: stdout stays the JSON answer, for scripts.
        line = install_command(creds.endpoint, str(body["AccessTokenId"]), str(body["AccessTokenCode"]))
        print(f"Install the agent on a source server (Python 3.6+, nothing else needed):\n  {line}", file=sys.stderr)
    return 0
