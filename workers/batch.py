"""The batch core: jobs in, outcomes out, on an engine. No broker, no Postgres, no Redis.

`BatchCore.run(jobs, on_outcome)` submits every job of a batch to the engine at once and reports each
job's outcome the moment that job finishes, so one long job never holds back the others. It raises for
nothing a job does: every job ends with a result or a typed error (tasks.errors), and what happens next
(recorded, retried) is the caller's business (workers.node). Tested with the SimulatedEngine alone.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass

from tasks.logs import job_fields
from tasks.errors import ErrorKind, JobError
from tasks.prompting import prompt_token_ids
from workers.engine import EngineError

log = logging.getLogger(__name__)

#: the request fields the engine takes as sampling parameters
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "stop")


@dataclass(frozen=True)
class Outcome:
    """How one job's generation ended: a `result` (the job resource's result object) or an `error`."""

    job: dict
    result: dict | None = None
    error: JobError | None = None
    seconds: float = 0.0  # from submission to the engine until the outcome

    @property
    def completion_tokens(self) -> int:
        return self.result["usage"]["completion_tokens"] if self.result else 0


def request_id(job: dict) -> str:
    """The engine request id of a job's attempt: unique per attempt, so a retry never meets its ghost."""
    return f"{job['id']}:{job['attempt']}"


def result_of(completion) -> dict:
    usage = {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
             "total_tokens": completion.prompt_tokens + completion.completion_tokens}
    # jsonb cannot store NUL
    return {"text": completion.text.replace("\x00", ""), "finish_reason": completion.finish_reason, "usage": usage}


def _report(on_outcome, outcome: Outcome) -> None:
    try:
        on_outcome(outcome)
    except Exception:  # noqa: BLE001 - one job's bookkeeping failure must not strand the rest
        log.exception("job %s: could not record its outcome", outcome.job["id"],
                      extra=job_fields(outcome.job["id"], outcome.job.get("attempt")))


class BatchCore:
    """Drives one engine for many batches at once (one per pool thread); knows which job runs where,
    so a cancelled job's generation can be aborted."""

    def __init__(self, engine, tokenizer, *, job_timeout: float):
        self.engine, self.tokenizer, self.job_timeout = engine, tokenizer, job_timeout
        self._inflight: dict[str, str] = {}  # job id -> engine request id
        self._lock = threading.Lock()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def abort(self, job_id: str) -> None:
        """Abort a job's generation if it runs here."""
        rid = self._inflight.get(job_id)
        if rid is not None:
            log.info("job %s was cancelled: aborting its generation", job_id, extra=job_fields(job_id))
            self.engine.abort(rid)

    def run(self, jobs: list[dict], on_outcome) -> None:
        """Generate every job (rows with id, attempt, request); call `on_outcome(Outcome)` for each as
        it finishes. A job still generating after job_timeout is aborted and reported as timed out."""
        pending = {}
        for job in jobs:
            submitted = self._submit(job)
            if isinstance(submitted, JobError):
                _report(on_outcome, Outcome(job, error=submitted))
            else:
                pending[submitted[0]] = (job, submitted[1], time.monotonic())
        deadline = time.monotonic() + self.job_timeout
        while pending:
            done, _ = wait(pending, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            if not done:
                self._time_out(pending, on_outcome)
                return
            for future in done:
                job, generation, submitted_at = pending.pop(future)
                self._forget(job)
                _report(on_outcome, self._outcome(job, generation, future, time.monotonic() - submitted_at))

    def _submit(self, job: dict):
        """Start one generation: (future, engine generation), or the JobError that refuses it."""
        request = job["request"]
        sampling = {k: request[k] for k in SAMPLING_FIELDS if request.get(k) is not None}
        if request.get("seed") is not None and request.get("temperature", 1.0) > 0:
            if not self.engine.supports_seed:
                return JobError(ErrorKind.INVALID_REQUEST,
                                "this engine cannot honour a per-request seed; omit it or use temperature 0")
            sampling["seed"] = request["seed"]
        try:
            ids = prompt_token_ids(self.tokenizer, request)
        except Exception as exc:  # noqa: BLE001 - a prompt the template rejects is the job's fault
            return JobError(ErrorKind.INVALID_REQUEST, f"cannot render the prompt: {exc}")
        with self._lock:
            self._inflight[str(job["id"])] = request_id(job)
        # The tenant salts vLLM's prefix cache: one tenant's prompts never hit blocks another's filled,
        # so cache timing reveals nothing across tenants.
        return self.engine.submit(request_id(job), ids, sampling, cache_salt=str(job.get("tenant_id") or ""))

    def _outcome(self, job: dict, generation: int, future, seconds: float) -> Outcome:
        try:
            completion = future.result()
        except EngineError as exc:
            if exc.kind is ErrorKind.ENGINE_DEAD:
                self._restart(generation)
            return Outcome(job, error=exc.job_error(), seconds=seconds)
        except Exception as exc:  # noqa: BLE001 - an engine failure nobody classified: worth another attempt
            log.exception("job %s: unrecognised engine failure", job["id"], extra=job_fields(job["id"], job.get("attempt")))
            return Outcome(job, error=JobError(ErrorKind.ENGINE_ERROR, f"the engine failed: {exc!r}"), seconds=seconds)
        result = result_of(completion)
        if job.get("rag_result") is not None:  # a RAG job: its citations and what retrieval found
            result |= job["rag_result"]
        return Outcome(job, result=result, seconds=seconds)

    def _restart(self, generation: int) -> None:
        """Rebuild a dead engine; a failed rebuild is logged, not raised (the jobs' outcomes still stand,
        and the node's probe reports the engine's state to the routers)."""
        try:
            self.engine.restart(generation)
        except Exception:  # noqa: BLE001
            log.exception("the engine could not be restarted")

    def _time_out(self, pending: dict, on_outcome) -> None:
        for job, _generation, _t in pending.values():
            self._forget(job)
            self.engine.abort(request_id(job))
            _report(on_outcome, Outcome(job, error=JobError(ErrorKind.TIMEOUT,
                                                            f"generation ran past {self.job_timeout} s")))

    def _forget(self, job: dict) -> None:
        with self._lock:
            self._inflight.pop(str(job["id"]), None)
