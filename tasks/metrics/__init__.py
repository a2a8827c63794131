"""Switchyard's Prometheus metrics: every metric object the code records into is defined here, with
the helper that records it, so a metric has one name and one meaning wherever it is counted.

How each process's numbers reach Prometheus, without one process speaking for another:

- **The API** runs under gunicorn with several worker processes, and a scrape reaches one of them.
  It therefore uses prometheus_client's multiprocess mode: ops/gunicorn.conf.py sets
  PROMETHEUS_MULTIPROC_DIR (emptied at start) before any worker imports prometheus_client, each worker
  writes its values to files there, a worker that exits is marked dead (its live gauges go), and
  `GET /metrics` on any worker adds up every worker's files (tasks.metrics.exposition).
- **Celery processes** (router, GPU worker, webhooks worker, ingest worker) all run the threads pool:
  one process each, so its default registry is the whole truth about it. Each serves that registry on
  its own port (tasks.metrics.exposition.serve, started from Celery's `worker_init` signal) and
  Prometheus scrapes every process; its queries sum across them. Multiprocess mode would add nothing
  there, and it would hide vLLM's own metrics, which vLLM registers in the GPU worker's default
  registry.
- **Cluster state** (queue depths, active jobs by status, dead letters, the node registry) is read from
  Redis and Postgres at scrape time by one collector (tasks.metrics.state.StateCollector) that only
  the API's `/metrics` serves: counted once, never summed over processes. With several API replicas
  each reports the same values, so queries take `max`.

Engine statistics are vLLM's own (`vllm:*`, tasks.metrics.engine); the SimulatedEngine reports the
running/waiting/token series under the same names so orchestration runs fill the same panels.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from datetime import datetime

from prometheus_client import Counter, Gauge, Histogram

from tasks.jobs.status import JobStatus

log = logging.getLogger(__name__)

#: request and attempt latencies, seconds (an API request, a webhook attempt, a search)
_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 600)
#: a job's phases, seconds: from milliseconds in a queue to the longest generation (job_timeout)
_PHASE = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)

# --- the API (multiprocess: one file per gunicorn worker, added up at scrape) -------------------------

http_request_seconds = Histogram(
    "switchyard_http_request_duration_seconds",
    "API requests by route (the URL rule, not the path), method and status, and how long each took; "
    "wait=true for requests that may wait for a job (long-poll, Prefer: wait, OpenAI completions).",
    ["method", "route", "status", "wait"], buckets=_FAST)
http_requests_in_progress = Gauge(
    "switchyard_http_requests_in_progress", "API requests being served now, by route (waits included).",
    ["method", "route"], multiprocess_mode="livesum")

# --- jobs ---------------------------------------------------------------------------------------------

job_transitions = Counter(
    "switchyard_job_transitions",
    "Jobs that entered a status (tasks.jobs.lifecycle): queued (submitted, retried, replayed), routed, "
    "running, succeeded, failed, cancelled, dead.", ["status"])
job_phase_seconds = Histogram(
    "switchyard_job_phase_seconds",
    "How long jobs spent in each phase: queued (due until routed: the fair queue), routed (routed until "
    "started: the node's queue), retrieval (RAG search), generation (in the engine), total (submitted "
    "until finished on a node).", ["phase"], buckets=_PHASE)
batch_size = Histogram(
    "switchyard_batch_size", "Jobs per generate batch a GPU worker takes from its queue.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
routing_decisions = Counter(
    "switchyard_routing_decisions", "Jobs routed to a node, by strategy and node.", ["strategy", "node"])

# --- the reconciler (tasks/jobs/reconciler.py) --------------------------------------------------------

#: what a sweep's counts mean; each key is an `action` label value
RECONCILER_ACTIONS = {
    "parked": "outcomes parked in Redis during a Postgres outage, recorded",
    "rerouted": "jobs taken back from a node whose heartbeat expired and routed again",
    "taken_back": "jobs taken back from a live node that held them past their deadline",
    "dead": "jobs taken back that had no attempts left: dead-lettered",
    "resent": "routed jobs whose message was lost, sent to their node again",
    "republished": "queued jobs whose route message was lost, published again",
    "deadline_cancelled": "jobs cancelled at their Cancel-After deadline",
    "documents_resent": "RAG documents whose ingestion stalled, sent to the ingest queue again",
    "batches_ended": "Batch API batches ended (completed, expired or cancelled) with their output files written",
    "purged": "finished jobs deleted by retention",
}
reconciler_actions = Counter(
    "switchyard_reconciler_actions", "What reconciler sweeps did, by action (see RECONCILER_ACTIONS).",
    ["action"])
reconciler_sweep_seconds = Histogram(
    "switchyard_reconciler_sweep_duration_seconds", "Reconciler sweeps (this router held the lock) and their length.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

# --- webhooks -----------------------------------------------------------------------------------------

#: a webhook attempt's outcome: delivered (2xx), failed (to be retried) or dead (no attempt follows)
WEBHOOK_OUTCOMES = ("delivered", "failed", "dead")
webhook_attempts = Counter(
    "switchyard_webhook_attempts",
    "Webhook delivery attempts by outcome: delivered (2xx), failed (retried later), dead (the last attempt, "
    "a 410, a refused URL or a disabled endpoint: dead-lettered).", ["outcome"])
webhook_attempt_seconds = Histogram(
    "switchyard_webhook_attempt_duration_seconds", "Time from sending a webhook to its answer (or failure).",
    buckets=_FAST)

# --- retrieval ----------------------------------------------------------------------------------------

retrieval_seconds = Histogram(
    "switchyard_retrieval_duration_seconds",
    "Retrieval searches (query embedding included) by mode, for jobs (caller=job: one call per batch "
    "group) and for the search endpoint (caller=api).", ["mode", "caller"], buckets=_FAST)


# --- helpers: what the code calls ---------------------------------------------------------------------


def observe_request(method: str, route: str, status: int, wait: bool, seconds: float) -> None:
    http_request_seconds.labels(method, route, str(status), "true" if wait else "false").observe(seconds)


def job_transition(status, n: int = 1) -> None:
    """`n` jobs entered `status` (a JobStatus or its value); call it only for a transition that happened."""
    if n:
        job_transitions.labels(getattr(status, "value", status)).inc(n)


def observe_phase(phase: str, seconds: float | None) -> None:
    if seconds is not None and seconds >= 0:
        job_phase_seconds.labels(phase).observe(seconds)


def _between(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start is not None and end is not None else None


def job_started(job: dict) -> None:
    """A job a node started: the time it waited on the node's queue (routed_at → started_at), when the
    row carries both timestamps."""
    observe_phase("routed", _between(job.get("routed_at"), job.get("started_at")))


def job_finished(job: dict, finished_at: datetime) -> None:
    """A job finished on a node (its outcome was accepted): submitted → finished, when the row carries
    `created_at`."""
    observe_phase("total", _between(job.get("created_at"), finished_at))


def routing_decision(strategy: str, node_id: str, waited: float | None = None) -> None:
    """A job routed to `node_id`; `waited`: seconds since it was due (its queued phase)."""
    routing_decisions.labels(strategy, node_id).inc()
    observe_phase("queued", waited)


def reconciler_sweep(counts: dict[str, int], seconds: float) -> None:
    """One sweep this process ran, with its counts (Reconciler.sweep's dict, each key an action). An
    action missing from RECONCILER_ACTIONS is still counted, and logged once: describe it there."""
    reconciler_sweep_seconds.observe(seconds)
    for action, n in counts.items():
        if action not in RECONCILER_ACTIONS and action not in _undescribed:
            _undescribed.add(action)
            log.warning("reconciler action %r is not described in tasks.metrics.RECONCILER_ACTIONS", action)
        if n:
            reconciler_actions.labels(action).inc(n)


_undescribed: set[str] = set()


def webhook_attempt(outcome: str, seconds: float | None) -> None:
    """One attempt's outcome (WEBHOOK_OUTCOMES); `seconds` when a request was sent."""
    if outcome not in WEBHOOK_OUTCOMES:
        raise ValueError(f"unknown webhook outcome {outcome!r}")
    webhook_attempts.labels(outcome).inc()
    if seconds is not None:
        webhook_attempt_seconds.observe(seconds)


@contextmanager
def timed_retrieval(mode: str, caller: str):
    """Time one search (raised or not) as `switchyard_retrieval_duration_seconds{mode, caller}`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        retrieval_seconds.labels(mode, caller).observe(time.perf_counter() - started)


def _ensure_children() -> None:
    """Every label value known in advance gets its series now, so a rate over an event that has not
    happened yet reads 0 rather than nothing (and the dashboards' queries resolve from the start)."""
    for status in JobStatus:
        job_transitions.labels(status.value)
    for action in RECONCILER_ACTIONS:
        reconciler_actions.labels(action)
    for outcome in WEBHOOK_OUTCOMES:
        webhook_attempts.labels(outcome)


_ensure_children()
