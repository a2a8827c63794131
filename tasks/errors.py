"""Job errors: one typed vocabulary for what can go wrong with a job, and one definition of what a
short outage of a backing service looks like.

A job's `error` column (and the API's job resource) holds `{"type": <ErrorKind>, "message": ...}`.
Whether another attempt may cure an error is decided here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import kombu.exceptions
import psycopg
import psycopg_pool
import redis


class ErrorKind(str, Enum):
    INVALID_REQUEST = "invalid_request"  # the job itself is bad (a prompt the template rejects ...)
    ENGINE_ERROR = "engine_error"  # the engine failed in a way the adapter does not recognise
    ENGINE_DEAD = "engine_dead"  # the engine core died under the job
    ENGINE_OVERLOADED = "engine_overloaded"  # out of memory or KV cache
    WORKER_LOST = "worker_lost"  # the node stopped heartbeating, restarted, or sat on the job too long
    TIMEOUT = "timeout"  # the generation ran past settings.job_timeout
    NO_NODE = "no_node"  # no live node served the model before settings.no_node_deadline
    CANCELLED = "cancelled"  # by the client
    RETRIEVAL_UNAVAILABLE = "retrieval_unavailable"  # a RAG job's search met Postgres unreachable

    @property
    def retryable(self) -> bool:
        return self in RETRYABLE


#: kinds another attempt may cure; everything else fails the job at once. An unrecognised engine
#: failure is retried: it is far more often the engine's trouble than the request's.
RETRYABLE = frozenset({ErrorKind.ENGINE_ERROR, ErrorKind.ENGINE_DEAD, ErrorKind.ENGINE_OVERLOADED,
                       ErrorKind.WORKER_LOST, ErrorKind.RETRIEVAL_UNAVAILABLE})

#: kinds that count as a crash of the attempt's worker or engine (poison-job detection)
CRASHES = frozenset({ErrorKind.WORKER_LOST, ErrorKind.ENGINE_DEAD})


@dataclass(frozen=True)
class JobError:
    """What went wrong with one attempt of a job."""

    kind: ErrorKind
    message: str

    @property
    def retryable(self) -> bool:
        return self.kind.retryable

    def as_json(self) -> dict:
        return {"type": self.kind.value, "message": self.message}

    @classmethod
    def from_json(cls, value: dict) -> "JobError":
        return cls(ErrorKind(value["type"]), value["message"])


#: exceptions that mean "a backing service (Postgres or Redis) is briefly unreachable": Celery tasks
#: autoretry on them, workers ride them out (tasks.retry.ride_out) and the API answers 503.
TRANSIENT = (psycopg.OperationalError, psycopg_pool.PoolTimeout, redis.ConnectionError, redis.TimeoutError,
             kombu.exceptions.OperationalError)


class QueueUnavailable(Exception):
    """Raised when a new job cannot be put on its queue (the broker is unreachable); nothing was stored."""
