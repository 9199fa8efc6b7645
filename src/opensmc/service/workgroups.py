"""Workgroup use cases: create, describe (with derived status), modify, delete, membership.

A workgroup's Status and Warnings are not stored: they are derived on every
read from the latest job of each member source (spec/API.md §1.8, whose
rules are inferred):

* no member job has started (none, or all Ready and never run) → NotStarted
* a job Running its final cut-over sync (final_run) → Cutover
* any job Running, Waiting or Stopped → InProgress
* every member job Finished → Completed
* otherwise (a mix of finished, failed, expired or not yet started jobs, at
  least one started) → InProgress

Warnings: `InError` lists the member sources whose job is InError,
`UnRelated` those with no job, `NotPassed` those whose latest image failed
its latest boot test (`ReplicationParameters` `boot_test`, or `opensmc image
boot-test`; service/boot_tests.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.exc import IntegrityError

from opensmc.clock import new_id
from opensmc.domain.enums import JobStatus, SourceState, WorkgroupStatus
from opensmc.domain.errors import Conflict, InvalidParameter, InvalidSourceState, MissingParameter, NotFound
from opensmc.params import Params
from opensmc.service import boot_tests, idempotency
from opensmc.service.context import Caller, Services
from opensmc.service.validation import check_description, check_name, page, parse_tags
from opensmc.store import idempotency as idem_store
from opensmc.store import tags as tag_store
from opensmc.store import workgroups as q
from opensmc.store.workgroups import MemberJob

MAX_SOURCES_PER_WORKGROUP = 50
MAX_IDS = 50
_ACTIVE = {JobStatus.RUNNING.value, JobStatus.WAITING.value, JobStatus.STOPPED.value}
STATUSES = tuple(s.value for s in WorkgroupStatus)


@dataclass(frozen=True)
class WorkgroupView:
    workgroup_id: str
    name: str
    description: str
    status: str
    tags: list[tuple[str, str]]
    #: (WarningType, source ids), only non-empty warnings
    warnings: list[tuple[str, list[str]]] = field(default_factory=list)


@dataclass(frozen=True)
class WorkgroupPage:
    total: int
    number: int
    size: int
    items: list[WorkgroupView]


def derive_status(members: Sequence[MemberJob]) -> str:
    """The workgroup Status from its members' latest jobs (rules in the module docstring)."""
    statuses = [m for m in members if m.status is not None]
    started = [m for m in statuses if m.status != JobStatus.READY.value or m.has_run]
    if not started:
        return WorkgroupStatus.NOT_STARTED.value
    if any(m.status == JobStatus.RUNNING.value and m.final_run for m in statuses):
        return WorkgroupStatus.CUTOVER.value
    if any(m.status in _ACTIVE for m in statuses):
        return WorkgroupStatus.IN_PROGRESS.value
    if all(m.status == JobStatus.FINISHED.value for m in statuses):
        return WorkgroupStatus.COMPLETED.value
    return WorkgroupStatus.IN_PROGRESS.value


def derive_warnings(members: Sequence[MemberJob]) -> list[tuple[str, list[str]]]:
    in_error = [m.source_id for m in members if m.status == JobStatus.IN_ERROR.value]
    unrelated = [m.source_id for m in members if m.status is None]
    out: list[tuple[str, list[str]]] = []
    if in_error:
        out.append(("InError", in_error))
    if unrelated:
        out.append(("UnRelated", unrelated))
    return out


def _duplicate(name: str) -> Conflict:
    return Conflict(
        "WorkgroupName.Duplicate",
        f'A workgroup named "{name}" already exists in this account. Choose another Name.',
    )


def _not_found(wg_id: str) -> NotFound:
    return NotFound("WorkgroupId", wg_id, code="InvalidWorkgroupId.NotFound")


# create / modify / delete ---------------------------------------------------


def create(svc: Services, caller: Caller, p: Params) -> str:
    """CreateWorkgroup; returns the WorkgroupId (the earlier one for a repeated ClientToken)."""
    name = check_name(p, "Name", p.req_str("Name"), lo=2, hi=64, dots=True)
    description = p.str("Description") or ""
    if description:
        check_description(p, "Description", description, lo=2, hi=256)
    pairs: list[tuple[str, str]] = []
    parsed = parse_tags(p, require_value=True)
    for (n, _g), (key, value) in zip(p.groups("Tag"), parsed, strict=True):
        if not value:  # workgroup tag values may not be empty, and a missing one is empty
            raise InvalidParameter(
                p.wire(f"Tag.{n}.Value"), "A workgroup tag needs a value.", code="InvalidParameter.TagValue"
            )
        pairs.append((key, value))
    token = idempotency.client_token(p)
    digest = idempotency.params_hash(p)
    try:
        with svc.db.begin() as conn:
            q.lock_account(conn, caller.account_id)
            earlier = idempotency.replay(conn, caller.account_id, "CreateWorkgroup", token, digest)
            if earlier is not None:
                return earlier
            if q.id_by_name(conn, caller.account_id, name) is not None:
                raise _duplicate(name)
            limit = svc.settings.max_workgroups_per_account
            if q.count(conn, caller.account_id) >= limit:
                raise Conflict(
                    "QuotaExceeded.Workgroup",
                    f"An account can have at most {limit} workgroups. Delete a workgroup you no longer need.",
                )
            now = svc.clock()
            wg_id = new_id("w-")
            q.insert_workgroup(conn, caller.account_id, wg_id, name, description, now)
            tag_store.put_tags(conn, caller.account_id, q.TAG_TYPE, wg_id, pairs, now)
            if token is not None:
                idem_store.record(conn, caller.account_id, "CreateWorkgroup", token, digest, wg_id, now)
            return wg_id
    except IntegrityError:
        # A concurrent request won the race (same token or same name): answer as if we came second.
        with svc.db.connect() as conn:
            earlier = idempotency.replay(conn, caller.account_id, "CreateWorkgroup", token, digest)
            if earlier is not None:
                return earlier
            if q.id_by_name(conn, caller.account_id, name) is not None:
                raise _duplicate(name) from None
        raise


def modify(svc: Services, caller: Caller, p: Params) -> None:
    wg_id = p.req_str("WorkgroupId")
    name = p.str("Name") or None
    if name is not None:
        check_name(p, "Name", name, lo=2, hi=64, dots=True)
    description = p.str("Description") or None
    if description is not None:
        check_description(p, "Description", description, lo=2, hi=256)
    try:
        with svc.db.begin() as conn:
            if q.get(conn, caller.account_id, wg_id, for_update=True) is None:
                raise _not_found(wg_id)
            values: dict[str, str] = {}
            if name is not None:
                other = q.id_by_name(conn, caller.account_id, name)
                if other is not None and other != wg_id:
                    raise _duplicate(name)
                values["name"] = name
            if description is not None:
                values["description"] = description
            q.update_attrs(conn, caller.account_id, wg_id, values)
    except IntegrityError:
        if name is None:  # only the name is unique; anything else is not ours to explain
            raise
        raise _duplicate(name) from None


def delete(svc: Services, caller: Caller, p: Params) -> None:
    wg_id = p.req_str("WorkgroupId")
    with svc.db.begin() as conn:
        if q.get(conn, caller.account_id, wg_id, for_update=True) is None:
            raise _not_found(wg_id)
        members = q.member_ids(conn, caller.account_id, wg_id)
        if members:
            shown = ", ".join(members[:5]) + (", ..." if len(members) > 5 else "")
            raise Conflict(
                "Workgroup.NotEmpty",
                f"The workgroup {wg_id} still has {len(members)} migration source(s) ({shown}). "
                "Disassociate them (DisassociateSourceServers) or delete them first.",
            )
        q.delete_workgroup(conn, caller.account_id, wg_id)


# membership ------------------------------------------------------------------


def _source_ids(p: Params) -> list[str]:
    ids = p.list("SourceId", max_n=MAX_SOURCES_PER_WORKGROUP)
    if not ids:
        raise MissingParameter("SourceId.1")
    return list(dict.fromkeys(ids))  # a repeated ID means the same source once


def associate(svc: Services, caller: Caller, p: Params) -> None:
    wg_id = p.req_str("WorkgroupId")
    ids = _source_ids(p)
    with svc.db.begin() as conn:
        # Locking the workgroup row serializes membership changes to it (the quota check).
        if q.get(conn, caller.account_id, wg_id, for_update=True) is None:
            raise _not_found(wg_id)
        found = q.sources_by_id(conn, caller.account_id, ids)
        for sid in ids:
            row = found.get(sid)
            if row is None:
                raise NotFound("SourceId", sid, code="InvalidSourceId.NotFound")
            state, member_of = row
            if state == SourceState.DELETING.value:
                raise InvalidSourceState(state, ("Available", "Unavailable", "InUse"))
            if member_of not in ("", wg_id):
                raise Conflict(
                    "SourceServer.InOtherWorkgroup",
                    f"The migration source {sid} already belongs to workgroup {member_of}. "
                    "Disassociate it from that workgroup first.",
                )
        current = set(q.member_ids(conn, caller.account_id, wg_id))
        after = current | set(ids)
        if len(after) > MAX_SOURCES_PER_WORKGROUP:
            raise Conflict(
                "QuotaExceeded.SourceServer",
                f"A workgroup holds at most {MAX_SOURCES_PER_WORKGROUP} migration sources; "
                f"it has {len(current)} and this request would make it {len(after)}.",
            )
        new = [s for s in ids if found[s][1] != wg_id]
        if new:
            changed = q.set_membership(conn, caller.account_id, new, expect=("",), to=wg_id)
            if changed != len(new):
                # Another request moved one of them meanwhile (SQLite serializes, so PostgreSQL only).
                raise Conflict(
                    "SourceServer.InOtherWorkgroup",
                    "A migration source was associated with another workgroup concurrently. Retry.",
                )


def disassociate(svc: Services, caller: Caller, p: Params) -> None:
    wg_id = p.req_str("WorkgroupId")
    ids = _source_ids(p)
    with svc.db.begin() as conn:
        if q.get(conn, caller.account_id, wg_id, for_update=True) is None:
            raise _not_found(wg_id)
        found = q.sources_by_id(conn, caller.account_id, ids)
        for sid in ids:
            row = found.get(sid)
            if row is None:
                raise NotFound("SourceId", sid, code="InvalidSourceId.NotFound")
            if row[1] != wg_id:
                raise Conflict(
                    "SourceServer.NotInWorkgroup",
                    f"The migration source {sid} is not a member of workgroup {wg_id}.",
                )
        q.set_membership(conn, caller.account_id, ids, expect=(wg_id,), to="")


# describe ----------------------------------------------------------------------


def describe(svc: Services, caller: Caller, p: Params) -> WorkgroupPage:
    ids = p.list("WorkgroupId", max_n=MAX_IDS)
    name = p.str("Name") or None
    status = p.str("Status", choices=STATUSES) if p.raw("Status") else None
    tag_filters = parse_tags(p)
    number, size = page(p)
    with svc.db.connect() as conn:
        rows = q.search(conn, caller.account_id, ids=ids, name=name, tag_filters=tag_filters)
        members = q.members_with_jobs(conn, caller.account_id, [str(r.id) for r in rows])
        views = [(r, derive_status(members[str(r.id)]), derive_warnings(members[str(r.id)])) for r in rows]
        for _r, _s, warns in views:  # a source whose latest image failed its boot test (service/boot_tests.py)
            sources = [m.source_id for m in members[str(_r.id)] if m.status is not None]
            failed = boot_tests.not_passed(svc, conn, sources)
            if failed:
                warns.append(("NotPassed", failed))
        if status is not None:
            views = [v for v in views if v[1] == status]
        total = len(views)
        chosen = views[(number - 1) * size : number * size]
        tags = tag_store.tags_of(conn, q.TAG_TYPE, [str(r.id) for r, _s, _w in chosen])
    items = [
        WorkgroupView(
            workgroup_id=str(r.id),
            name=str(r.name),
            description=str(r.description),
            status=st,
            tags=tags.get(str(r.id), []),
            warnings=warns,
        )
        for r, st, warns in chosen
    ]
    return WorkgroupPage(total=total, number=number, size=size, items=items)
