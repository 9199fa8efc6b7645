"""TagResources, UntagResources and ListTagResources (spec/API.md §3.17, 3.23, 3.24).

Resources are migration sources (`sourceserver`) and replication jobs
(`replicationjob`) of the caller's account; a job being deleted no longer
counts. The error codes and messages are the documented ones (all 400).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import Connection

from opensmc.domain.enums import ResourceType
from opensmc.domain.errors import InvalidParameter, MissingParameter, SmcError
from opensmc.params import Params
from opensmc.service.context import Caller, Services
from opensmc.service.validation import MAX_TAGS, parse_tags
from opensmc.store import tags as q

MAX_RESOURCE_IDS = 50
#: ListTagResources answers in pages of this many (resource, tag) pairs
PAGE_SIZE = 50


@dataclass(frozen=True)
class TagResource:
    resource_id: str
    resource_type: str  #: the wire name, e.g. ALIYUN::SMC::SOURCESERVER
    key: str
    value: str


@dataclass(frozen=True)
class TagPage:
    items: list[TagResource]
    next_token: str


def _bad(code: str, message: str) -> SmcError:
    return SmcError(message, code=code, http_status=400)


def resource_type(p: Params) -> ResourceType:
    raw = p.raw("ResourceType")
    if raw is None or raw == "":
        err = MissingParameter("ResourceType", code="MissingParameter.ResourceType")
        err.message = "You must specify ResourceType."
        err.args = (err.message,)
        raise err
    for rt in ResourceType:
        # lower case on the wire; the response spelling (ALIYUN::SMC::…) is accepted too
        if raw.lower() in (rt.value, rt.wire_name.lower()):
            return rt
    raise _bad(
        "InvalidResourceType.NotFound",
        "The specified ResourceType does not exist. Use sourceserver or replicationjob.",
    )


def resource_ids(p: Params, *, required: bool) -> list[str]:
    ids = p.list("ResourceId")
    if len(ids) > MAX_RESOURCE_IDS:
        raise _bad(
            "NumberExceed.ResourceIds",
            f"The maximum number of ResourceId parameters cannot exceed {MAX_RESOURCE_IDS}.",
        )
    if required and not ids:
        raise MissingParameter("ResourceId.1")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise _bad("Duplicate.ResourceId", f"The ResourceId contains duplicate values: {dup}.")
    return ids


def _check_exist(conn: Connection, caller: Caller, rtype: ResourceType, ids: list[str]) -> None:
    found = q.existing_resources(conn, caller.account_id, rtype.value, ids)
    missing = [i for i in ids if i not in found]
    if missing:
        raise _bad(
            "InvalidResourceId.NotFound",
            f"The specified ResourceIds do not exist: {', '.join(missing)}.",
        )


def tag(svc: Services, caller: Caller, p: Params) -> None:
    rtype = resource_type(p)
    ids = resource_ids(p, required=True)
    pairs = [(k, v or "") for k, v in parse_tags(p)]
    if not pairs:
        raise MissingParameter("Tag.1.Key")
    keys = [k for k, _v in pairs]
    with svc.db.begin() as conn:
        _check_exist(conn, caller, rtype, ids)
        # Checked for every resource before any tag is added: all or nothing.
        for rid in ids:
            after = q.count_keys_after(conn, rtype.value, rid, keys)
            if after > MAX_TAGS:
                raise _bad(
                    "NumberExceed.Tags",
                    f"The maximum number of the Tag parameters cannot exceed {MAX_TAGS}: "
                    f"{rid} would have {after} tags. Remove some first (UntagResources).",
                )
        now = svc.clock()
        for rid in ids:
            q.put_tags(conn, caller.account_id, rtype.value, rid, pairs, now)


def untag(svc: Services, caller: Caller, p: Params) -> None:
    rtype = resource_type(p)
    ids = resource_ids(p, required=True)
    keys = list(dict.fromkeys(p.list("TagKey")))
    if len(keys) > MAX_TAGS:
        raise _bad("NumberExceed.Tags", f"The maximum number of the Tag parameters cannot exceed {MAX_TAGS}.")
    remove_all = bool(p.bool("All", default=False))
    if not keys and not remove_all:
        err = MissingParameter("TagKey.1")
        err.message += " Give the keys to remove as TagKey.N, or All=true to remove every tag."
        err.args = (err.message,)
        raise err
    with svc.db.begin() as conn:
        _check_exist(conn, caller, rtype, ids)
        for rid in ids:
            # TagKey.N wins over All (All is only used when no keys are given).
            q.remove_tags(conn, rtype.value, rid, keys or None)


# ListTagResources paging ----------------------------------------------------------


def _query_digest(caller: Caller, p: Params) -> str:
    """Binds a NextToken to the account and the filters it was issued for."""
    items = sorted((k, p.raw(k) or "") for k in p.keys() if k not in ("NextToken", "RegionId"))
    return json.dumps([caller.account_id, items])


def _mac(digest: str, rid: str, key: str) -> str:
    return hashlib.sha256(json.dumps([digest, rid, key]).encode()).hexdigest()[:16]


def _encode_token(digest: str, rid: str, key: str) -> str:
    raw = json.dumps([rid, key, _mac(digest, rid, key)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(p: Params, digest: str, token: str) -> tuple[str, str]:
    bad = InvalidParameter(
        p.wire("NextToken"),
        "It is not a token from the previous page of this query. Pass the NextToken exactly as "
        "returned, with the same ResourceType, ResourceId.N and Tag.N, or leave it out to start over.",
    )
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if (
        not isinstance(data, list)
        or len(data) != 3
        or not all(isinstance(x, str) for x in data)
        or data[2] != _mac(digest, data[0], data[1])
    ):
        raise bad
    return data[0], data[1]


def list_tags(svc: Services, caller: Caller, p: Params) -> TagPage:
    rtype = resource_type(p)
    ids = resource_ids(p, required=False)
    filters = parse_tags(p)
    digest = _query_digest(caller, p)
    token = p.str("NextToken") or ""
    after = _decode_token(p, digest, token) if token else None
    with svc.db.connect() as conn:
        if ids:
            _check_exist(conn, caller, rtype, ids)
        rows = q.list_page(
            conn, caller.account_id, rtype.value, ids=ids, filters=filters, after=after, limit=PAGE_SIZE + 1
        )
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    next_token = _encode_token(digest, rows[-1][0], rows[-1][1]) if more else ""
    return TagPage(
        items=[TagResource(rid, rtype.wire_name, key, value) for rid, key, value in rows],
        next_token=next_token,
    )
