"""The replication job state machine (DESIGN.md §4), as one table.

A job's state is the pair (Status, BusinessStatus). Each :class:`JobEvent`
names the states it may start from and the state it leads to. The store
performs every transition as a guarded UPDATE built from this table, so the
table is the single authority: a test walks every (state, event) pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from opensmc.domain.enums import BusinessStatus as B
from opensmc.domain.enums import JobStatus as S
from opensmc.domain.errors import InvalidJobStatus

State = tuple[S, B]


class JobEvent(StrEnum):
    START = "start"  #: StartReplicationJob
    SCHEDULE = "schedule"  #: ModifyReplicationJobAttribute set a ScheduledStartTime on a Ready job
    SCHEDULED_START = "scheduled_start"  #: ScheduledStartTime reached, or next incremental run due
    PREPARED = "prepared"  #: staging allocated, task handed to the agent
    SYNCED = "synced"  #: the agent reported every disk synced
    PROCESSED = "processed"  #: image created
    FINISH = "finish"  #: staging released, RunOnce (or final cut-over run)
    WAIT = "wait"  #: staging kept, incremental job waits for its next run
    STOP = "stop"  #: StopReplicationJob
    FAIL = "fail"  #: agent, receiver or processing error; agent lost
    CUTOVER_SYNC = "cutover_sync"  #: CutOverReplicationJob SyncData=true
    CUTOVER_NOW = "cutover_now"  #: CutOverReplicationJob SyncData=false
    EXPIRE = "expire"  #: past ValidTime
    DELETE = "delete"  #: DeleteReplicationJob


RUNNING_ANY: frozenset[State] = frozenset((S.RUNNING, b) for b in (B.PREPARING, B.SYNCING, B.PROCESSING, B.CLEANING))
IDLE = B.NONE


@dataclass(frozen=True)
class Transition:
    event: JobEvent
    sources: frozenset[State]
    target: State

    @property
    def allowed_statuses(self) -> list[str]:
        """The Status values named in ReplicationJob.InvalidStatus messages, in table order."""
        seen: list[str] = []
        for status in S:
            if any(src[0] is status for src in self.sources) and status.value not in seen:
                seen.append(status.value)
        return seen


def _t(event: JobEvent, sources: set[State] | frozenset[State], target: State) -> Transition:
    return Transition(event, frozenset(sources), target)


TRANSITIONS: dict[JobEvent, Transition] = {
    t.event: t
    for t in (
        _t(JobEvent.START, {(S.READY, IDLE), (S.STOPPED, IDLE), (S.IN_ERROR, IDLE)}, (S.RUNNING, B.PREPARING)),
        _t(JobEvent.SCHEDULE, {(S.READY, IDLE)}, (S.WAITING, IDLE)),
        _t(JobEvent.SCHEDULED_START, {(S.WAITING, IDLE)}, (S.RUNNING, B.PREPARING)),
        _t(JobEvent.PREPARED, {(S.RUNNING, B.PREPARING)}, (S.RUNNING, B.SYNCING)),
        _t(JobEvent.SYNCED, {(S.RUNNING, B.SYNCING)}, (S.RUNNING, B.PROCESSING)),
        _t(JobEvent.PROCESSED, {(S.RUNNING, B.PROCESSING)}, (S.RUNNING, B.CLEANING)),
        _t(JobEvent.FINISH, {(S.RUNNING, B.CLEANING)}, (S.FINISHED, IDLE)),
        _t(JobEvent.WAIT, {(S.RUNNING, B.CLEANING)}, (S.WAITING, IDLE)),
        _t(JobEvent.STOP, {(S.RUNNING, B.SYNCING), (S.WAITING, IDLE)}, (S.STOPPED, IDLE)),
        _t(JobEvent.FAIL, RUNNING_ANY, (S.IN_ERROR, IDLE)),
        _t(JobEvent.CUTOVER_SYNC, {(S.WAITING, IDLE)}, (S.RUNNING, B.PREPARING)),
        _t(JobEvent.CUTOVER_NOW, {(S.WAITING, IDLE)}, (S.FINISHED, IDLE)),
        _t(
            JobEvent.EXPIRE,
            {(S.READY, IDLE), (S.STOPPED, IDLE), (S.IN_ERROR, IDLE), (S.WAITING, IDLE)},
            (S.EXPIRED, IDLE),
        ),
        _t(
            JobEvent.DELETE,
            {
                (S.READY, IDLE),
                (S.STOPPED, IDLE),
                (S.IN_ERROR, IDLE),
                (S.WAITING, IDLE),
                (S.FINISHED, IDLE),
                (S.EXPIRED, IDLE),
            },
            (S.DELETING, IDLE),
        ),
    )
}


def next_state(event: JobEvent, current: State) -> State:
    """The state `event` leads to from `current`, or ReplicationJob.InvalidStatus."""
    t = TRANSITIONS[event]
    if current not in t.sources:
        raise InvalidJobStatus(describe(current), t.allowed_statuses)
    return t.target


def describe(state: State) -> str:
    """A state as users read it: `Running` becomes `Running(Syncing)`."""
    status, business = state
    return f"{status.value}({business.value})" if business is not B.NONE else status.value
