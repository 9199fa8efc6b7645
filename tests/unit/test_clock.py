"""Timestamps on the wire: `yyyy-MM-ddTHH:mm:ssZ` in UTC, whatever the database handed back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from opensmc.clock import iso, new_request_id


def test_iso_of_naive_aware_and_missing_times() -> None:
    assert iso(None) == ""
    assert iso(datetime(2026, 12, 2, 6, 20, 1, 999999)) == "2026-12-02T06:20:01Z"  # SQLite: naive, UTC
    assert iso(datetime(2026, 12, 2, 6, 20, 1, tzinfo=UTC)) == "2026-12-02T06:20:01Z"
    # A session in another time zone (PostgreSQL's TimeZone): converted, across midnight.
    east = timezone(timedelta(hours=8))
    assert iso(datetime(2026, 12, 2, 3, 0, 0, tzinfo=east)) == "2026-12-01T19:00:00Z"


@given(
    st.datetimes(min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30)),
    st.sampled_from([None, UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=5, minutes=30))]),
)
def test_iso_is_the_strftime_form_in_utc(moment: datetime, zone: timezone | None) -> None:
    dt = moment.replace(tzinfo=zone)
    utc = dt.replace(tzinfo=UTC) if zone is None else dt.astimezone(UTC)
    assert iso(dt) == utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_request_ids_are_upper_case_version_4_uuids_and_distinct() -> None:
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        u = uuid.UUID(rid)
        assert u.version == 4 and u.variant == uuid.RFC_4122
        assert rid == str(u).upper()
