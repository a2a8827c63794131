"""Job notifications over Redis pub/sub: `finished` wakes long-polls, `cancel` aborts running jobs.

Pub/sub is fire-and-forget; Postgres stays the source of truth. A waiter always re-reads the job
after subscribing, so a notification that raced ahead of it is never needed.
"""

from __future__ import annotations

FINISHED_CHANNEL = "switchyard:jobs:finished"
CANCEL_CHANNEL = "switchyard:jobs:cancel"


def job_finished(redis, job_id) -> None:
    redis.publish(FINISHED_CHANNEL, str(job_id))


def cancel_requested(redis, job_id) -> None:
    redis.publish(CANCEL_CHANNEL, str(job_id))
