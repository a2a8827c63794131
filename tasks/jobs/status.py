"""The job state machine's states, shared by the API, the store and the workers."""

from enum import Enum


class JobStatus(str, Enum):
    QUEUED = "queued"
    ROUTED = "routed"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.DEAD})
ACTIVE = frozenset(JobStatus) - TERMINAL
#: for SQL: `status = ANY(%s)`
ACTIVE_VALUES = sorted(s.value for s in ACTIVE)
TERMINAL_VALUES = sorted(s.value for s in TERMINAL)
