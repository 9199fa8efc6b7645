"""The job state table (DESIGN.md §4), pair by pair, written out independently of the code."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opensmc.domain.enums import BusinessStatus as B
from opensmc.domain.enums import JobStatus as S
from opensmc.domain.errors import InvalidJobStatus
from opensmc.domain.transitions import TRANSITIONS, JobEvent, State, describe, next_state

E = JobEvent
N = B.NONE
IDLE_NOT_RUNNING = [(S.READY, N), (S.STOPPED, N), (S.IN_ERROR, N), (S.WAITING, N)]

#: DESIGN.md §4, one row per allowed (state, event) → target
EXPECTED: dict[tuple[State, JobEvent], State] = {
    ((S.READY, N), E.START): (S.RUNNING, B.PREPARING),
    ((S.STOPPED, N), E.START): (S.RUNNING, B.PREPARING),
    ((S.IN_ERROR, N), E.START): (S.RUNNING, B.PREPARING),
    ((S.READY, N), E.SCHEDULE): (S.WAITING, N),
    ((S.WAITING, N), E.SCHEDULED_START): (S.RUNNING, B.PREPARING),
    ((S.RUNNING, B.PREPARING), E.PREPARED): (S.RUNNING, B.SYNCING),
    ((S.RUNNING, B.SYNCING), E.SYNCED): (S.RUNNING, B.PROCESSING),
    ((S.RUNNING, B.PROCESSING), E.PROCESSED): (S.RUNNING, B.CLEANING),
    ((S.RUNNING, B.CLEANING), E.FINISH): (S.FINISHED, N),
    ((S.RUNNING, B.CLEANING), E.WAIT): (S.WAITING, N),
    ((S.RUNNING, B.SYNCING), E.STOP): (S.STOPPED, N),
    ((S.WAITING, N), E.STOP): (S.STOPPED, N),
    **{((S.RUNNING, b), E.FAIL): (S.IN_ERROR, N) for b in (B.PREPARING, B.SYNCING, B.PROCESSING, B.CLEANING)},
    ((S.WAITING, N), E.CUTOVER_SYNC): (S.RUNNING, B.PREPARING),
    ((S.WAITING, N), E.CUTOVER_NOW): (S.FINISHED, N),
    **{(s, E.EXPIRE): (S.EXPIRED, N) for s in IDLE_NOT_RUNNING},
    **{(s, E.DELETE): (S.DELETING, N) for s in [*IDLE_NOT_RUNNING, (S.FINISHED, N), (S.EXPIRED, N)]},
}

ALL_STATES: list[State] = list(itertools.product(S, B))
VALID_STATES: set[State] = {(s, N) for s in S if s is not S.RUNNING} | {
    (S.RUNNING, b) for b in B if b is not N
}


def _name(state: State) -> str:
    return f"{state[0].value}/{state[1].value or '-'}"


@pytest.mark.parametrize("event", list(JobEvent), ids=lambda e: e.value)
@pytest.mark.parametrize("state", ALL_STATES, ids=_name)
def test_every_pair(state: State, event: JobEvent) -> None:
    expected = EXPECTED.get((state, event))
    if expected is not None:
        assert next_state(event, state) == expected
        return
    with pytest.raises(InvalidJobStatus) as info:
        next_state(event, state)
    msg = info.value.message
    assert f"status: {describe(state)} is invalid" in msg
    allowed = sorted({src[0].value for (src, ev) in EXPECTED if ev is event})
    assert allowed, "every event is allowed from somewhere"
    for status in allowed:
        assert status in msg.split("following status:")[1]
    assert info.value.code == "ReplicationJob.InvalidStatus"
    assert info.value.http_status == 400


def test_table_has_no_extra_pairs() -> None:
    in_code = {(src, ev): t.target for ev, t in TRANSITIONS.items() for src in t.sources}
    assert in_code == EXPECTED


def test_describe_shows_business_status() -> None:
    assert describe((S.RUNNING, B.SYNCING)) == "Running(Syncing)"
    assert describe((S.READY, N)) == "Ready"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(list(JobEvent)), max_size=60), st.sampled_from([(S.READY, N), (S.WAITING, N)])
)
def test_random_sequences_stay_in_the_table(events: list[JobEvent], start: State) -> None:
    state = start
    reachable_targets = set(EXPECTED.values()) | {start}
    for event in events:
        try:
            new = next_state(event, state)
        except InvalidJobStatus:
            assert (state, event) not in EXPECTED
            continue
        assert (state, event) in EXPECTED
        assert new == EXPECTED[(state, event)]
        state = new
        assert state in VALID_STATES
        assert state in reachable_targets
