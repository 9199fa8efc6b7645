"""Activation-code actions: CreateAccessToken, DeleteAccessToken, DisableAccessToken, ListAccessTokens.

Count, RegisteredCount and TimeToLiveInDays are strings holding integers on
the wire, in requests and responses alike (spec/API.md §3.2, §3.16).
"""

from __future__ import annotations

from typing import Any

from opensmc.api.registry import Action
from opensmc.clock import iso
from opensmc.domain.enums import TokenStatus
from opensmc.domain.errors import InvalidParameter
from opensmc.params import Params
from opensmc.service import tokens
from opensmc.service.context import Caller, Services
from opensmc.service.validation import check_name

DESCRIPTION_MAX = 1024
#: ListAccessTokens has no paging input; the output's PageSize is at least this (the documented default).
LIST_PAGE_SIZE = 20


def _create(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    name = p.str("Name") or ""
    if name:
        check_name(p, "Name", name)
    description = p.str("Description", max_len=DESCRIPTION_MAX) or ""
    count = p.int("Count", lo=1, hi=1000)
    ttl = p.int("TimeToLiveInDays", lo=1, hi=90)
    token_id, code = tokens.create(
        svc,
        caller,
        name=name,
        description=description,
        count=100 if count is None else count,
        ttl_days=30 if ttl is None else ttl,
    )
    return {"AccessTokenId": token_id, "AccessTokenCode": code}


def _delete(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    tokens.delete(svc, caller, p.req_str("AccessTokenId"))
    return {}


def _disable(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    tokens.disable(svc, caller, p.req_str("AccessTokenId"))
    return {}


def _list(svc: Services, caller: Caller, p: Params) -> dict[str, Any]:
    ids = p.list("AccessTokenId")
    name = p.str("Name") or None
    raw_status = p.str("Status") or None
    status: TokenStatus | None = None
    if raw_status is not None:
        try:
            status = TokenStatus(raw_status)
        except ValueError:
            raise InvalidParameter(p.wire("Status"), "Allowed values: activated, unactivated, expired.") from None
    found = tokens.list_tokens(svc, caller, ids=ids, name=name, status=status)
    now = svc.clock()
    items = [
        {
            "AccessTokenId": t.id,
            "Name": t.name,
            "Description": t.description,
            "Count": str(t.count),
            "RegisteredCount": str(t.registered_count),
            "TimeToLiveInDays": str(t.ttl_days),
            "CreationTime": iso(t.created_at),
            "Status": t.status(now).value,
        }
        for t in found
    ]
    return {
        "TotalCount": len(items),
        "PageNumber": 1,
        "PageSize": max(LIST_PAGE_SIZE, len(items)),
        "AccessTokens": {"AccessToken": items},
    }


ACTIONS: tuple[Action, ...] = (
    Action(
        "CreateAccessToken",
        _create,
        ("Name", "Description", "Count", "TimeToLiveInDays"),
        notes="The code is returned once and stored only as a salted SHA-256 hash. "
        "Description is free text up to 1024 characters. Use it on a source server with the one-line "
        "install command (`curl -fsSL SERVER/agent/install.sh | sudo sh -s -- --token-id <AccessTokenId> "
        "--token-code <AccessTokenCode>`, docs/agent.md), which `opensmc call CreateAccessToken` prints on "
        "stderr.",
    ),
    Action("DeleteAccessToken", _delete, ("AccessTokenId",)),
    Action(
        "DisableAccessToken",
        _disable,
        ("AccessTokenId",),
        notes="A disabled code is listed with Status=expired (the enum has no disabled status).",
    ),
    Action(
        "ListAccessTokens",
        _list,
        ("AccessTokenId.N", "Name", "Status"),
        notes="No paging: every match is returned with PageNumber=1 and PageSize=max(20, count). "
        "Name is an exact match.",
    ),
)
