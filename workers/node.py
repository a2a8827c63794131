"""The node runtime: a GPU worker's bookkeeping around the batch core.

`Node(items)` is what the generate task calls with a batch of (job id, attempt): it starts the jobs
through the lifecycle (skipping those cancelled or superseded meanwhile), runs them on the batch core,
and hands each outcome back to the lifecycle: succeeded, failed, or retried as the next attempt. Around
that it keeps the node's health (EWMA latencies the heartbeat advertises, a cooldown after
infrastructure failures), runs a job that was in the middle of repeated crashes alone, and rides out a
short Postgres outage; a finished outcome that still cannot be recorded after settings.outage_tolerance
is parked in Redis for the reconciler, never dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone

from tasks.logs import job_fields
from tasks import metrics
from tasks.errors import TRANSIENT, ErrorKind, JobError
from tasks.jobs import events, lifecycle, store
from tasks.retry import ride_out
from tasks.routing import registry
from workers.batch import BatchCore, Outcome

log = logging.getLogger(__name__)

_EWMA_ALPHA = 0.2
#: A job that was running in this many crashes (worker or engine died) runs alone from then on, so a
#: poison job's next crash takes nothing else with it, and jobs that merely ran beside it twice finish.
SOLO_AFTER_CRASHES = 2


class SoloGate:
    """Many batches share the engine; a suspect job waits for it to be idle and runs alone, and batches
    that arrive meanwhile wait for it (so suspects cannot starve)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._solo_waiting = 0
        self._solo = False

    @contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._solo and not self._solo_waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._solo_waiting += 1
            self._cond.wait_for(lambda: not self._solo and not self._shared)
            self._solo_waiting -= 1
            self._solo = True
        try:
            yield
        finally:
            with self._cond:
                self._solo = False
                self._cond.notify_all()


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else _EWMA_ALPHA * new + (1 - _EWMA_ALPHA) * old


class Node:
    def __init__(self, app, engine, tokenizer, retrieval=None):
        self.app, self.settings = app, app.settings
        self.retrieval = retrieval  # a workers.retrieval_phase.RetrievalPhase, for RAG jobs
        self.node_id = app.settings.node_id
        self.deltas = events.DeltaWriter(app.redis)  # the text of streamed jobs, as it is produced
        self.core = BatchCore(engine, tokenizer, job_timeout=app.settings.job_timeout, on_delta=self.deltas.delta)
        self.ewma_job_seconds: float | None = None
        self.ewma_token_seconds: float | None = None
        self._failing = False  # a failure was reported to the registry and not yet cleared
        self._gate = SoloGate()

    @property
    def inflight(self) -> int:
        return self.core.inflight

    def abort(self, job_id: str) -> None:
        """Abort a job's generation if it runs here (its row is already `cancelled`)."""
        self.core.abort(job_id)

    def __call__(self, items: list[tuple[str, int]]) -> None:
        metrics.batch_size.observe(len(items))
        # Only a retried job can have crashed before; first attempts skip the query.
        retried = [i for i, a in items if a > 1]
        crashes = self._durably(lambda: store.crash_counts(self.app.db, retried), "reading crash counts") if retried else {}
        normal = [(i, a) for i, a in items if crashes.get(str(i), 0) < SOLO_AFTER_CRASHES]
        if normal:
            with self._gate.shared():
                self.core.run(self._retrieve(self._start(normal)), self._record)
        for item in items:
            if crashes.get(str(item[0]), 0) >= SOLO_AFTER_CRASHES:
                # Marked running only once it has the engine to itself: if it crashes the node again,
                # no job merely waiting behind it is blamed.
                with self._gate.exclusive():
                    log.warning("job %s was running in %d crashes: running it alone", item[0], crashes[str(item[0])],
                                extra=job_fields(item[0], item[1], self.node_id))
                    self.core.run(self._retrieve(self._start([item])), self._record)

    def _durably(self, fn, what: str):
        return ride_out(fn, tolerance=self.settings.outage_tolerance, what=what)

    def _start(self, items: list[tuple[str, int]]) -> list[dict]:
        jobs = self._durably(lambda: lifecycle.start(self.app, items, self.node_id), "marking jobs running")
        for job in jobs:
            metrics.job_started(job)
        return jobs

    def _retrieve(self, jobs: list[dict]) -> list[dict]:
        """The retrieval phase for the batch's RAG jobs (a cheap check for the others): their prompts
        gain the retrieved passages; a job whose search failed is recorded here and not generated."""
        rag = [j for j in jobs if j["request"].get("rag")]
        if not rag:
            return jobs
        if self.retrieval is None:
            failed = [(j, JobError(ErrorKind.INVALID_REQUEST, "this worker has no retrieval set up")) for j in rag]
            ready = []
        else:
            items = [(str(j["id"]), j["attempt"]) for j in rag]
            self._stamp(items, "retrieval_started_at")
            started = time.monotonic()
            ready, failed = self.retrieval.run(rag)
            elapsed = time.monotonic() - started
            for _ in ready:  # each job of the batch waited for the whole batch's retrieval
                metrics.observe_phase("retrieval", elapsed)
            self._stamp([(str(j["id"]), j["attempt"]) for j in ready], "retrieved_at")
        for job, error in failed:
            self._record(Outcome(job, error=error))
        augmented = {str(j["id"]): j for j in ready}
        return [augmented.get(str(j["id"]), j) if j["request"].get("rag") else j for j in jobs
                if not j["request"].get("rag") or str(j["id"]) in augmented]

    def _stamp(self, items: list[tuple[str, int]], column: str) -> None:
        if items:
            self._durably(lambda: store.mark_retrieval(self.app.db, items, column), f"recording {column}")

    def _record(self, outcome: Outcome) -> None:
        """Hand one outcome to the lifecycle; park it if Postgres stays away past the outage tolerance."""
        job, error = outcome.job, outcome.error
        if (job.get("request") or {}).get("stream"):
            self.deltas.flush()  # its last words reach its event stream before its end does
        if error is None:
            self._healthy(outcome)
            metrics.observe_phase("generation", outcome.seconds)
        elif (error.retryable or error.kind is ErrorKind.TIMEOUT) and error.kind is not ErrorKind.RETRIEVAL_UNAVAILABLE:
            self._unhealthy()  # (a search that met Postgres away says nothing about this node's engine)
        try:
            if error is not None and error.retryable:
                self._durably(lambda: lifecycle.retry(self.app, job, self.node_id, error), f"re-queueing job {job['id']}")
            elif self._durably(lambda: lifecycle.finish(self.app, job, self.node_id, result=outcome.result, error=error),
                               f"recording job {job['id']}"):
                metrics.job_finished(job, datetime.now(timezone.utc))
        except TRANSIENT:
            log.error("job %s: Postgres unreachable past the outage tolerance; parking its outcome in Redis",
                      job["id"], extra=job_fields(job["id"], job.get("attempt"), self.node_id, job.get("tenant_id")))
            self._durably(lambda: lifecycle.park(self.app, job, self.node_id, result=outcome.result, error=error),
                          f"parking job {job['id']}")

    def _healthy(self, outcome: Outcome) -> None:
        """Update the EWMA latencies the heartbeat advertises (weighted response time reads them)."""
        self.ewma_job_seconds = _ewma(self.ewma_job_seconds, outcome.seconds)
        if outcome.completion_tokens:
            self.ewma_token_seconds = _ewma(self.ewma_token_seconds, outcome.seconds / outcome.completion_tokens)
        if self._failing:
            self._failing = False
            self._redis("ending the cooldown", lambda: registry.record_success(self.app.redis, self.node_id))

    def _unhealthy(self) -> None:
        """Passive health: infrastructure failures put this node in a cooldown with back-off."""
        self._failing = True
        s = self.settings
        self._redis("starting a cooldown", lambda: registry.record_failure(self.app.redis, self.node_id,
                                                                          base=s.cooldown_base, cap=s.cooldown_max))

    def _redis(self, what: str, fn) -> None:
        try:
            fn()
        except TRANSIENT as exc:
            log.warning("%s failed: %r", what, exc)
