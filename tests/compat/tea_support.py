"""Helpers for the Tea SDK sessions: reading bodies and errors through the SDK's models."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from alibabacloud_smc20190601 import models as m
from Tea.exceptions import TeaException

REGION = "local"


def body(resp: Any) -> Any:
    """The response body model, which must exist (None means the SDK could not map the shape)."""
    assert resp.status_code == 200
    assert resp.body is not None, f"Tea could not map the response: {resp.to_map()}"
    assert resp.body.request_id
    return resp.body


def tea_error(call: Callable[..., Any], *args: Any) -> TeaException:
    with pytest.raises(TeaException) as info:
        call(*args)
    return info.value


def status_of(e: TeaException) -> int:
    return int(e.data["statusCode"]) if e.data else -1


def iso_utc(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_job(tea: Any, job_id: str) -> Any:
    b = body(tea.describe_replication_jobs(m.DescribeReplicationJobsRequest(job_id=[job_id])))
    assert b.total_count == 1
    return b.replication_jobs.replication_job[0]
