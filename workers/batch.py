"""The batch runner: the GPU worker's core, `list[(job id, attempt)] -> outcomes written to Postgres`.

It marks the batch running (skipping jobs cancelled or superseded meanwhile), submits every job to the
engine at once, and records each result as soon as that job finishes, so one long job never holds back
the others. It raises for nothing a single job does: each job ends succeeded, failed, or re-queued for
another attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, wait

from tasks import notify, store
from tasks.prompting import prompt_token_ids
from tasks.router import publish
from tasks.status import JobStatus
from workers.engine import EngineDead, EngineError

log = logging.getLogger(__name__)


def request_id(job_id, attempt: int) -> str:
    return f"{job_id}:{attempt}"


class BatchRunner:
    def __init__(self, *, settings, pool, redis, celery, engine, tokenizer):
        self.settings, self.pool, self.redis, self.celery = settings, pool, redis, celery
        self.engine, self.tokenizer = engine, tokenizer
        self._inflight: dict[str, str] = {}  # job id -> engine request id
        self._lock = threading.Lock()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def abort(self, job_id: str) -> None:
        """Abort a job's generation if it runs here (its row is already `cancelled`)."""
        rid = self._inflight.get(job_id)
        if rid is not None:
            log.info("job %s was cancelled: aborting its generation", job_id)
            self.engine.abort(rid)

    def __call__(self, items: list[tuple[str, int]]) -> None:
        jobs = store.start_jobs(self.pool, items, self.settings.node_id)
        if len(jobs) < len(items):
            log.info("skipped %d of %d jobs (cancelled or superseded)", len(items) - len(jobs), len(items))
        pending = {}
        for job in jobs:
            submitted = self._submit(job)
            if submitted is not None:
                pending[submitted[0]] = (job, submitted[1])
        deadline = time.monotonic() + self.settings.job_timeout
        while pending:
            done, _ = wait(pending, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            if not done:
                for job, _generation in pending.values():
                    with self._lock:
                        self._inflight.pop(str(job["id"]), None)
                    self.engine.abort(request_id(job["id"], job["attempt"]))
                    self._fail(job, {"type": "timeout", "message": f"generation ran past {self.settings.job_timeout} s"})
                return
            for future in done:
                job, generation = pending.pop(future)
                try:
                    self._finish(job, generation, future)
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

    def _finish(self, job: dict, generation: int, future) -> None:
        job_id = str(job["id"])
        with self._lock:
            self._inflight.pop(job_id, None)
        try:
            completion = future.result()
        except EngineDead as exc:
            self.engine.restart(generation)
            self._retry(job, {"type": "engine_dead", "message": str(exc)})
            return
        except EngineError as exc:
            self._fail(job, {"type": "invalid_request", "message": str(exc)})
            return
        result = {
            "text": completion.text.replace("\x00", ""),  # jsonb cannot store NUL
            "finish_reason": completion.finish_reason,
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                      "total_tokens": completion.prompt_tokens + completion.completion_tokens},
        }
        if store.finish_job(self.pool, job_id, job["attempt"], JobStatus.SUCCEEDED, result=result):
            notify.job_finished(self.redis, job_id)

    def _fail(self, job: dict, error: dict) -> None:
        if store.finish_job(self.pool, job["id"], job["attempt"], JobStatus.FAILED, error=error):
            notify.job_finished(self.redis, job["id"])

    def _retry(self, job: dict, error: dict) -> None:
        row = store.requeue_job(self.pool, job["id"], job["attempt"], error, max_attempts=self.settings.max_attempts)
        if row is None:
            notify.job_finished(self.redis, job["id"])  # failed for good (or moved on)
            return
        log.warning("job %s: %s; re-queued as attempt %d", job["id"], error["message"], row["attempt"])
        publish(self.celery, row["id"], row["attempt"], job["model"], row["routing_strategy"])
