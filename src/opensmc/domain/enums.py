"""The SMC enumerations (spec/API.md §1), as str enums so they store and render as-is."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    READY = "Ready"  #: created, not started
    RUNNING = "Running"  #: running; see BusinessStatus
    STOPPED = "Stopped"  #: paused by StopReplicationJob
    IN_ERROR = "InError"  #: failed; ErrorCode and StatusInfo say why
    FINISHED = "Finished"  #: complete
    WAITING = "Waiting"  #: incremental job between runs, or scheduled start pending
    EXPIRED = "Expired"  #: past ValidTime; deleted 7 days later
    DELETING = "Deleting"  #: being deleted


#: Statuses that block a second job on the same source (spec/API.md §1.1).
UNFINISHED = frozenset(
    {
        JobStatus.READY,
        JobStatus.RUNNING,
        JobStatus.STOPPED,
        JobStatus.WAITING,
        JobStatus.IN_ERROR,
        JobStatus.EXPIRED,
    }
)


class BusinessStatus(StrEnum):
    NONE = ""  #: not running
    PREPARING = "Preparing"  #: staging being allocated, task handed to the agent
    SYNCING = "Syncing"  #: data moving
    PROCESSING = "Processing"  #: image being made
    CLEANING = "Cleaning"  #: staging being released


class SourceState(StrEnum):
    AVAILABLE = "Available"
    UNAVAILABLE = "Unavailable"
    IN_USE = "InUse"
    DELETING = "Deleting"


class TokenStatus(StrEnum):
    ACTIVATED = "activated"
    UNACTIVATED = "unactivated"
    EXPIRED = "expired"


class WorkgroupStatus(StrEnum):
    NOT_STARTED = "NotStarted"
    IN_PROGRESS = "InProgress"
    CUTOVER = "Cutover"
    COMPLETED = "Completed"


class RunType(StrEnum):
    MANUAL = "Manual"
    SCHEDULE = "Schedule"


class TargetType(StrEnum):
    IMAGE = "Image"
    CONTAINER_IMAGE = "ContainerImage"
    TARGET_INSTANCE = "TargetInstance"


class ResourceType(StrEnum):
    SOURCE_SERVER = "sourceserver"
    REPLICATION_JOB = "replicationjob"

    @property
    def wire_name(self) -> str:
        """The ResourceType as ListTagResources returns it."""
        return "ALIYUN::SMC::SOURCESERVER" if self is ResourceType.SOURCE_SERVER else "ALIYUN::SMC::REPLICATIONJOB"
