"""The batch runner: the GPU worker's core, `list[(job id, attempt)] -> outcomes written to Postgres`.

It marks the batch running (skipping jobs cancelled or superseded meanwhile), submits every job to the
engine at once, and records each result as soon as that job finishes, so one long job never holds back
the others. It raises for nothing a single job does: each job ends succeeded, failed, dead, or queued
again as its next attempt. A short Postgres or Redis outage is ridden out (settings.outage_tolerance)
rather than dropping the jobs in hand.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, wait
from contextlib import contextmanager

from tasks import notify, registry, store
from tasks.prompting import prompt_token_ids
from tasks.retry import RETRYABLE, backoff, ride_out
from tasks.router import publish
from tasks.status import JobStatus
from workers.engine import EngineError

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


def request_id(job_id, attempt: int) -> str:
    return f"{job_id}:{attempt}"


class BatchRunner:
    def __init__(self, *, settings, pool, redis, celery, engine, tokenizer):
        self.settings, self.pool, self.redis, self.celery = settings, pool, redis, celery
        self.engine, self.tokenizer = engine, tokenizer
        self.node_id = settings.node_id
        self._inflight: dict[str, str] = {}  # job id -> engine request id
        self._lock = threading.Lock()
        self.ewma_job_seconds: float | None = None
        self.ewma_token_seconds: float | None = None
        self._failing = False  # a failure was reported to the registry and not yet cleared
        self._gate = SoloGate()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def abort(self, job_id: str) -> None:
        """Abort a job's generation if it runs here (its row is already `cancelled`)."""
        rid = self._inflight.get(job_id)
        if rid is not None:
            log.info("job %s was cancelled: aborting its generation", job_id)
            self.engine.abort(rid)

    def _durably(self, fn, what: str):
        return ride_out(fn, tolerance=self.settings.outage_tolerance, what=what)

    def __call__(self, items: list[tuple[str, int]]) -> None:
        crashes = self._durably(lambda: store.crash_counts(self.pool, [i for i, _ in items]), "reading crash counts")
        normal = [(i, a) for i, a in items if crashes.get(str(i), 0) < SOLO_AFTER_CRASHES]
        if normal:
            with self._gate.shared():
                self._run(self._start(normal))
        for item in items:
            if crashes.get(str(item[0]), 0) >= SOLO_AFTER_CRASHES:
                # Marked running only once it has the engine to itself: if it crashes the node again,
                # no job merely waiting behind it is blamed.
                with self._gate.exclusive():
                    log.warning("job %s was running in %d crashes: running it alone", item[0], crashes[str(item[0])])
                    self._run(self._start([item]))

    def _start(self, items: list[tuple[str, int]]) -> list[dict]:
        jobs = self._durably(lambda: store.start_jobs(self.pool, items, self.node_id), "marking jobs running")
        started = {registry.member(j["id"], j["attempt"]) for j in jobs}
        skipped = [registry.member(i, a) for i, a in items if registry.member(i, a) not in started]
        if skipped:
            log.info("skipped %d of %d jobs (cancelled, superseded or delivered twice)", len(skipped), len(items))
            self._best_effort(lambda: registry.release(self.redis, self.node_id, skipped))
        return jobs

    def _run(self, jobs: list[dict]) -> None:
        pending = {}
        for job in jobs:
            submitted = self._submit(job)
            if submitted is not None:
                pending[submitted[0]] = (job, submitted[1], time.monotonic())
        deadline = time.monotonic() + self.settings.job_timeout
        while pending:
            done, _ = wait(pending, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            if not done:
                for job, _generation, _t in pending.values():
                    self._forget(job)
                    self.engine.abort(request_id(job["id"], job["attempt"]))
                    self._fail(job, {"type": "timeout", "message": f"generation ran past {self.settings.job_timeout} s"})
                self._unhealthy()
                return
            for future in done:
                job, generation, submitted_at = pending.pop(future)
                try:
                    self._finish(job, generation, future, time.monotonic() - submitted_at)
                except Exception:  # noqa: BLE001 - one job's bookkeeping failure must not strand the rest
                    log.exception("job %s: could not record its outcome", job["id"])

    def _submit(self, job: dict):
        job_id, request = str(job["id"]), job["request"]
        sampling = {k: request[k] for k in ("max_tokens", "temperature", "top_p", "stop") if request.get(k) is not None}
        if request.get("seed") is not None and request.get("temperature", 1.0) > 0:
            if not self.engine.supports_seed:
                self._fail(job, {"type": "invalid_request",
                                 "message": "this engine cannot honour a per-request seed; omit it or use temperature 0"})
                return None
            sampling["seed"] = request["seed"]
        try:
            ids = prompt_token_ids(self.tokenizer, request)
        except Exception as exc:  # noqa: BLE001 - a prompt the template rejects is the job's fault
            self._fail(job, {"type": "invalid_request", "message": f"cannot render the prompt: {exc}"})
            return None
        rid = request_id(job_id, job["attempt"])
        with self._lock:
            self._inflight[job_id] = rid
        return self.engine.submit(rid, ids, sampling)

    def _forget(self, job: dict) -> None:
        with self._lock:
            self._inflight.pop(str(job["id"]), None)

    def _finish(self, job: dict, generation: int, future, seconds: float) -> None:
        self._forget(job)
        try:
            completion = future.result()
        except EngineError as exc:
            error = {"type": exc.kind, "message": str(exc)}
            if exc.kind == "engine_dead":
                self.engine.restart(generation)
            if exc.kind in RETRYABLE:
                self._unhealthy()
                self._retry(job, error)
            else:
                self._fail(job, error)
            return
        self._observe(seconds, completion.completion_tokens)
        result = {
            "text": completion.text.replace("\x00", ""),  # jsonb cannot store NUL
            "finish_reason": completion.finish_reason,
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                      "total_tokens": completion.prompt_tokens + completion.completion_tokens},
        }
        self._record(job, JobStatus.SUCCEEDED, result=result)

    def _observe(self, seconds: float, tokens: int) -> None:
        """Update the EWMA latencies the heartbeat advertises (weighted response time reads them)."""
        def ewma(old, new):
            return new if old is None else _EWMA_ALPHA * new + (1 - _EWMA_ALPHA) * old

        self.ewma_job_seconds = ewma(self.ewma_job_seconds, seconds)
        if tokens:
            self.ewma_token_seconds = ewma(self.ewma_token_seconds, seconds / tokens)
        if self._failing:
            self._failing = False
            self._best_effort(lambda: registry.record_success(self.redis, self.node_id))

    def _unhealthy(self) -> None:
        """Passive health: infrastructure failures put this node in a cooldown with back-off."""
        self._failing = True
        s = self.settings
        self._best_effort(lambda: registry.record_failure(self.redis, self.node_id, base=s.cooldown_base,
                                                          cap=s.cooldown_max))

    def _record(self, job: dict, status: JobStatus, *, result=None, error=None) -> None:
        if self._durably(lambda: store.finish_job(self.pool, job["id"], job["attempt"], status, node_id=self.node_id,
                                                  result=result, error=error), f"recording job {job['id']}"):
            self._done(job)
        else:
            self._release(job)

    def _fail(self, job: dict, error: dict) -> None:
        self._record(job, JobStatus.FAILED, error=error)

    def _retry(self, job: dict, error: dict) -> None:
        s = self.settings
        delay = backoff(job["attempt"], base=s.retry_backoff_base, cap=s.retry_backoff_max)
        row = self._durably(lambda: store.retry_job(self.pool, job["id"], job["attempt"], error, delay=delay),
                            f"re-queueing job {job['id']}")
        if row is None or row["status"] != "queued":
            self._done(job)  # dead (or moved on): tell its waiters
            return
        self._release(job)
        log.warning("job %s: %s; attempt %d in %.1f s", job["id"], error["message"], row["attempt"], delay)
        # If this publish is lost, the reconciler re-publishes the queued job (settings.redispatch_after).
        self._best_effort(lambda: publish(self.celery, row, countdown=delay))

    def _release(self, job: dict) -> None:
        self._best_effort(lambda: registry.release(self.redis, self.node_id, [registry.member(job["id"], job["attempt"])]))

    def _done(self, job: dict) -> None:
        self._release(job)
        self._best_effort(lambda: notify.job_finished(self.redis, job["id"]))

    def _best_effort(self, fn) -> None:
        """Redis side effects that Postgres does not depend on: ride out a blip, then log and move on."""
        try:
            self._durably(fn, "a Redis update")
        except Exception:  # noqa: BLE001 - the job's state in Postgres is already right
            log.exception("redis side effect failed")
