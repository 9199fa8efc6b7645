"""DescribeReplicationJobs: filters, pagination, and everything a job's view needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row

from opensmc.domain.enums import BusinessStatus, JobStatus
from opensmc.params import Params
from opensmc.service.context import Caller, Services
from opensmc.service.validation import page, parse_tags
from opensmc.store import jobs as q
from opensmc.store import tags as tagq

#: once, not per request (iterating an Enum is slow)
STATUSES = tuple(s.value for s in JobStatus)
BUSINESS_STATUSES = tuple(b.value for b in BusinessStatus if b.value)


@dataclass
class JobView:
    row: Row[Any]
    runs: list[Row[Any]] = field(default_factory=list)
    tags: list[tuple[str, str]] = field(default_factory=list)
    workgroup_id: str = ""


@dataclass
class JobPage:
    total: int
    page_number: int
    page_size: int
    jobs: list[JobView]


def describe_jobs(svc: Services, caller: Caller, p: Params) -> JobPage:
    number, size = page(p)
    region = p.str("RegionId", max_len=64)
    f = q.JobFilter(
        account_id=caller.account_id,
        job_ids=p.list("JobId", max_n=50),
        source_ids=p.list("SourceId", max_n=50),
        instance_ids=p.list("InstanceId", max_n=50),
        name=p.str("Name", max_len=128) or None,
        status=p.str("Status", choices=STATUSES) or None,
        business_status=p.str("BusinessStatus", choices=BUSINESS_STATUSES) or None,
        job_type=p.int("JobType", lo=0, hi=3),
        # The legacy SDK sends its client region on every request: RegionId filters only
        # when it names a configured region (no job can be in any other).
        region_id=region if region in svc.settings.regions else None,
        resource_group_id=p.str("ResourceGroupId", max_len=64) or None,
        tags=parse_tags(p, allow_missing_key=True),
    )
    with svc.db.connect() as conn:
        total, rows = q.list_jobs(conn, f, number, size)
        ids = [r.id for r in rows]
        runs = q.runs_of(conn, ids)
        tags = tagq.tags_of(conn, q.JOB_RTYPE, ids)
        groups = q.workgroups_of(conn, [r.source_id for r in rows])
    views = [
        JobView(row=r, runs=runs.get(r.id, []), tags=tags.get(r.id, []), workgroup_id=groups.get(r.source_id, ""))
        for r in rows
    ]
    return JobPage(total=total, page_number=number, page_size=size, jobs=views)
