"""The job lifecycle: one function per transition, each the only place that transition happens.

    queued ─route→ routed ─start→ running ─finish→ succeeded | failed
       │  ↖──────── retry / requeue_lost ───────────┘     (retry → dead, dead-lettered, once out of attempts)
       ├─fail_unroutable→ failed                         cancel: any active status → cancelled
       └─ (dead ─replay→ queued)

Each function does the conditional update in Postgres (tasks.jobs.store: a transition names the status
and attempt it expects, so a stale or duplicate caller changes nothing), then the tail that goes with
it, in this order: release the node's slot (its assigned set), wake the job's waiters, publish what
comes next. The API, the route task, the GPU worker and the reconciler call these; none of them repeats
that tail.

`app` is the process's SwitchyardCelery (tasks.celery_app): its settings, Postgres pool (`app.db`),
Redis client (`app.redis`) and `send_task`. A function raises only while nothing has changed (Postgres
unreachable: tasks.errors.TRANSIENT), so a caller may simply call it again. The Redis side effects
after the commit are best effort: if Redis fails there, the reconciler repairs what was missed
(assigned sets are resynced, a queued job without its message is published again, a routed one is
sent again), and waiters re-read Postgres when their subscription comes back.
"""

from __future__ import annotations

import json
import logging
import time

import redis as redis_lib

from tasks import metrics
from tasks.errors import TRANSIENT, ErrorKind, JobError, QueueUnavailable
from tasks.jobs import cache, dead_letters, events, notify, store, stranded
from tasks.jobs.status import JobStatus
from tasks.logs import job_fields
from tasks.names import GENERATE_TASK, ROUTE_TASK, node_queue, route_queue
from tasks.retry import backoff
from tasks.routing import registry

log = logging.getLogger(__name__)

#: finished attempts whose outcome could not reach Postgres in time: {job:attempt: outcome JSON}
PARKED_KEY = "switchyard:parked"
#: what a broker or Redis call may raise: a short outage, or Redis refusing a write (out of memory)
_REDIS_FAILURES = (*TRANSIENT, redis_lib.RedisError)


# --- the tail ---------------------------------------------------------------------------------------


def _best_effort(what: str, fn) -> None:
    try:
        fn()
    except _REDIS_FAILURES as exc:
        log.warning("%s failed (%r); the reconciler will repair it", what, exc)


def _release(app, node_id: str | None, job_id, attempt: int) -> None:
    if node_id:
        _best_effort("releasing a node slot",
                     lambda: registry.release(app.redis, node_id, [registry.member(job_id, attempt)]))


def _announce(app, job_id, status: str, attempt: int, *, finished: bool = True) -> None:
    """A status event on the job's event stream; a finished job's long-polls woken too."""
    def write():
        with app.redis.pipeline(transaction=False) as pipe:
            events.status(pipe, job_id, status, attempt)
            if finished:
                notify.job_finished(pipe, job_id)
            pipe.execute()

    _best_effort("announcing a job's status", write)


def publish(app, job: dict, *, countdown: float = 0.0) -> None:
    """Put a queued job (a row with store.DISPATCH_COLUMNS) on its strategy's route queue; `countdown`
    delays it (retry back-off). Raises if the broker is unreachable."""
    strategy = job["routing_strategy"]
    # Its cost in fair dispatch: the output-token budget (a DISPATCH_COLUMNS row has it as a column).
    cost = job.get("max_tokens") or (job.get("request") or {}).get("max_tokens") or 1
    app.send_task(
        ROUTE_TASK,
        args=[str(job["id"]), job["attempt"], job["model"], strategy, time.time() + countdown],
        kwargs={"affinity_key": job.get("affinity_key"), "tenant_id": str(job["tenant_id"]),
                "priority": job["priority"], "cost": cost},
        queue=route_queue(strategy),
        countdown=countdown or None,
    )


def _publish(app, job: dict, *, countdown: float = 0.0) -> None:
    _best_effort(f"publishing job {job['id']}", lambda: publish(app, job, countdown=countdown))


def send_to_node(app, job_id, attempt: int, node_id: str) -> None:
    """The job's generate message, on its node's queue. Its task id is the job's `job:attempt`
    member, so the reconciler can tell whether a routed job's message still exists."""
    app.send_task(GENERATE_TASK, args=[str(job_id), attempt], queue=node_queue(node_id),
                  task_id=registry.member(job_id, attempt), retries=attempt - 1)  # as Flower shows it


# --- transitions -----------------------------------------------------------------------------------


def submit(app, **job) -> tuple[dict, bool]:
    """→ queued, published to its strategy's queue. Returns (row, created); an Idempotency-Key replay
    returns the original job with created=False. Raises QueueUnavailable, leaving nothing stored, when
    the broker refuses the job.

    A job that opted in to the result cache and finds its answer there is stored `succeeded` at once,
    with that answer (tasks.jobs.cache); nothing is published."""
    hit = None
    if cache.wanted(job["request"]):
        try:
            hit = cache.lookup(app.redis, job["tenant_id"], job["model"], job["request"])
        except _REDIS_FAILURES as exc:  # the cache is an optimisation: run the job
            log.warning("result cache unreachable (%r); the job runs", exc)
    row, created = store.insert_job(app.db, **job, cached_result=hit)
    if created and hit is None:
        try:
            publish(app, row)
        except _REDIS_FAILURES as exc:
            store.delete_unpublished_job(app.db, row["id"])
            raise QueueUnavailable("the job queue is unreachable; nothing was stored") from exc
    if created:
        metrics.job_transition(JobStatus.QUEUED)
        if hit is not None:
            metrics.job_transition(JobStatus.SUCCEEDED)
    return row, created


def route(app, job_id, attempt: int, node_id: str) -> str | None:
    """queued → routed to `node_id` (chosen by a strategy, which already counted it there), then its
    message on that node's queue. Returns the node the job is routed to, or None when it moved on.

    A job already routed at this attempt (an earlier try of this route message marked it, then could
    not publish, or its router died in between) is sent again to the node it was routed to: a
    duplicate message is harmless, since a start is fenced by the attempt."""
    if store.mark_routed(app.db, job_id, attempt, node_id) is not None:
        metrics.job_transition(JobStatus.ROUTED)
    else:
        routed_to = store.routed_node(app.db, job_id, attempt)
        if routed_to != node_id:  # the strategy counted the job on a node it is not going to
            _release(app, node_id, job_id, attempt)
        if routed_to is None:
            return None  # cancelled meanwhile, or a stale message for an older attempt
        node_id = routed_to
    send_to_node(app, job_id, attempt, node_id)
    return node_id


def route_many(app, items: list[tuple[str, int, str]]) -> None:
    """route() for many (job id, attempt, node id): one Postgres statement for all of them, then their
    node messages. A job that was not queued at that attempt takes route()'s own path."""
    moved = store.mark_routed_many(app.db, items)
    metrics.job_transition(JobStatus.ROUTED, len(moved))
    for job_id, attempt, node_id in items:
        if (str(job_id), attempt) in moved:
            send_to_node(app, job_id, attempt, node_id)
        else:
            route(app, job_id, attempt, node_id)


def wait_for_node(app, job_id, attempt: int) -> bool:
    """A queued job finds no routable node yet: keep it queued (and out of the reconciler's stalled
    jobs) while its route message waits; False when it moved on, so the message can be dropped."""
    return store.mark_waiting(app.db, job_id, attempt)


def fail_unroutable(app, job_id, attempt: int, error: JobError) -> bool:
    """queued → failed: no live node served the job's model before its deadline."""
    if not store.fail_queued_job(app.db, job_id, attempt, error.as_json()):
        return False
    metrics.job_transition(JobStatus.FAILED)
    _announce(app, job_id, JobStatus.FAILED.value, attempt)
    return True


def start(app, items: list[tuple[str, int]], node_id: str) -> list[dict]:
    """routed → running for a batch of (job id, attempt); returns the jobs this node may run. The
    others (cancelled, superseded by a newer attempt, or a duplicate message) give back their slot."""
    jobs = store.start_jobs(app.db, items, node_id)
    metrics.job_transition(JobStatus.RUNNING, len(jobs))
    if jobs:
        def announce():
            with app.redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    events.status(pipe, job["id"], JobStatus.RUNNING.value, job["attempt"])
                pipe.execute()

        _best_effort("announcing started jobs", announce)
    started = {registry.member(j["id"], j["attempt"]) for j in jobs}
    skipped = [(str(i), a) for i, a in items if registry.member(i, a) not in started]
    if skipped:
        log.info("skipped %d of %d jobs (cancelled, superseded or delivered twice)", len(skipped), len(items))
        # A second copy of a job already running here keeps its slot: the first copy releases it.
        active = stranded.active_attempts(app.db, [i for i, _ in skipped])
        done = [registry.member(i, a) for i, a in skipped if active.get(i) != (a, node_id)]
        _best_effort("releasing skipped jobs", lambda: registry.release(app.redis, node_id, done))
    return jobs


def finish(app, job: dict, node_id: str, *, result: dict | None = None, error: JobError | None = None) -> bool:
    """running → succeeded (with `result`) or failed (with a permanent `error`). False when the attempt
    had been superseded or cancelled: its outcome is logged as discarded."""
    status = JobStatus.FAILED if error is not None else JobStatus.SUCCEEDED
    accepted = store.finish_job(app.db, job["id"], job["attempt"], status, node_id=node_id, result=result,
                                error=error.as_json() if error is not None else None)
    _release(app, node_id, job["id"], job["attempt"])
    if accepted:
        metrics.job_transition(status)
        _announce(app, job["id"], status.value, job["attempt"])
        if result is not None and cache.wanted(job.get("request") or {}):
            _best_effort("filling the result cache",
                         lambda: cache.remember(app.redis, job, result, app.settings.result_cache_ttl))
    return accepted


def retry(app, job: dict, node_id: str | None, error: JobError, *, charge: bool = True) -> str | None:
    """routed|running → queued as the next attempt after a retryable failure, published after a
    jittered back-off when the attempt is charged; or, once the job is out of attempts, the dead-letter
    transition: → dead with a dead letter, in the same Postgres transaction, and its waiters woken.
    Returns the job's new status, or None when it had moved on."""
    s = app.settings
    delay = backoff(job["attempt"], base=s.retry_backoff_base, cap=s.retry_backoff_max) if charge else 0.0
    row = store.retry_job(app.db, job["id"], job["attempt"], error.as_json(), delay=delay, charge=charge)
    return _after_requeue(app, job, node_id, row, delay)


def requeue_lost(app, job: dict, error: JobError) -> str | None:
    """Take a job (id, attempt, node_id, status) back from a node that lost it (dead, restarted, or
    holding it past its deadline).

    A job that was only waiting on the node is blameless: it is re-routed at once, its budget of
    attempts untouched. One that was running there is charged an attempt (so a job that kills every
    worker it runs on ends `dead`) and waits a jittered back-off, which also separates it from the
    jobs that were running beside it."""
    return retry(app, job, job["node_id"], error, charge=job["status"] == JobStatus.RUNNING.value)


def _after_requeue(app, job: dict, node_id: str | None, row: dict | None, delay: float) -> str | None:
    _release(app, node_id, job["id"], job["attempt"])
    if row is None:
        return None
    metrics.job_transition(row["status"])
    if row["status"] == JobStatus.QUEUED.value:
        log.warning("job %s: attempt %d in %.1f s", job["id"], row["attempt"], delay,
                    extra=job_fields(job["id"], row["attempt"], node_id, job.get("tenant_id")))
        _announce(app, job["id"], row["status"], row["attempt"], finished=False)
        _publish(app, row, countdown=delay)
    else:
        _announce(app, job["id"], row["status"], row["attempt"])
    return row["status"]


def cancel(app, job_id, tenant_id, reason: str = "cancelled by the client") -> dict | None:
    """queued|routed|running → cancelled by the client (or by its Cancel-After deadline, which the
    reconciler enforces); a running generation is aborted by its node. Returns the cancelled row, or
    None when the job is missing or already finished."""
    row = store.cancel_job(app.db, job_id, tenant_id, JobError(ErrorKind.CANCELLED, reason).as_json())
    if row is None:
        return None
    metrics.job_transition(JobStatus.CANCELLED)
    _best_effort("asking the node to abort", lambda: notify.cancel_requested(app.redis, job_id))
    _announce(app, job_id, row["status"], row["attempt"])
    return row


def replay(app, dead_letter_id, tenant_id=None) -> dict | None:
    """dead → queued as the next attempt, with a fresh budget of attempts, and published. None when
    there is no open dead letter with that id (for that tenant)."""
    row = dead_letters.replay_dead_letter(app.db, dead_letter_id, tenant_id)
    if row is not None:
        metrics.job_transition(JobStatus.QUEUED)
        _publish(app, row)
    return row


def redispatch(app, job: dict) -> None:
    """A queued job whose route message was lost (or never sent): publish it again."""
    publish(app, job)


# --- outcomes parked while Postgres is away ---------------------------------------------------------


def park(app, job: dict, node_id: str, *, result: dict | None = None, error: JobError | None = None) -> None:
    """Keep a finished attempt's outcome in Redis, for finish_parked() to record, when Postgres stayed
    unreachable past the worker's outage tolerance: a result that cost a generation is never dropped."""
    outcome = {"id": str(job["id"]), "attempt": job["attempt"], "node_id": node_id, "result": result,
               "error": error.as_json() if error is not None else None}
    app.redis.hset(PARKED_KEY, registry.member(job["id"], job["attempt"]), json.dumps(outcome))


def finish_parked(app, each=lambda: None) -> int:
    """Record every parked outcome (retryable errors as retries); returns how many were recorded.
    `each()` is called before each one (the reconciler extends its lock there)."""
    done = 0
    for member, raw in app.redis.hscan_iter(PARKED_KEY):
        each()
        outcome = json.loads(raw)
        job = {"id": outcome["id"], "attempt": outcome["attempt"]}
        error = JobError.from_json(outcome["error"]) if outcome["error"] else None
        if error is not None and error.retryable:
            retry(app, job, outcome["node_id"], error)
        else:
            finish(app, job, outcome["node_id"], result=outcome["result"], error=error)
        app.redis.hdel(PARKED_KEY, member)
        done += 1
    return done
