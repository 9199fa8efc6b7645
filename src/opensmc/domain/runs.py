"""Rules about job runs that the data plane asks about: pure, no I/O."""

from __future__ import annotations

from opensmc.domain.enums import BusinessStatus, JobStatus

#: statuses in which a job may still run again, and so keeps what its next run reuses
MAY_RUN_AGAIN = (
    JobStatus.READY.value,
    JobStatus.RUNNING.value,
    JobStatus.STOPPED.value,
    JobStatus.IN_ERROR.value,
    JobStatus.WAITING.value,
)


def is_syncing_run(status: str, business: str, current_run: int | None, run_id: int) -> bool:
    """Is `run_id` the job's current run, and is it Syncing? Only then may data move for it."""
    return status == JobStatus.RUNNING.value and business == BusinessStatus.SYNCING.value and current_run == run_id


def progress_percent(bytes_done: int, bytes_total: int, *, safe: bool) -> float:
    """Progress as DescribeReplicationJobs shows it (0-100, two decimals).

    100 means every byte of the run is safe on the receiver: until the agent's
    final flush is acknowledged (`safe`) it stops at 99.99, however many bytes
    were read.
    """
    if safe:
        return 100.0
    if bytes_total <= 0:
        return 0.0
    return min(99.99, round(bytes_done * 100.0 / bytes_total, 2))
