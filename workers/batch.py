"""The batch core: jobs in, outcomes out, on an engine. No broker, no Postgres, no Redis.

`BatchCore.run(jobs, on_outcome)` submits every job of a batch to the engine at once and reports each
job's outcome the moment that job finishes, so one long job never holds back the others. It raises for
nothing a job does: every job ends with a result or a typed error (tasks.errors), and what happens next
(recorded, retried) is the caller's business (workers.node). Tested with the SimulatedEngine alone.

Below the core, the batching glue's duty towards operators: the Celery task events of every message of a
celery-batches task (generate, route), which celery-batches does not send (see "What Flower shows").
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass

from celery import signals, states
from celery_batches import Batches

from tasks.logs import job_fields
from tasks.errors import ErrorKind, JobError
from tasks.names import GENERATE_TASK, ROUTE_TASK
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
                      extra=job_fields(outcome.job["id"], outcome.job.get("attempt"),
                                       tenant=outcome.job.get("tenant_id")))
    batch = getattr(_running, "batch", None)  # the celery-batches batch this thread runs, if any
    if batch is not None:
        batch.finished(outcome)


class BatchCore:
    """Drives one engine for many batches at once (one per pool thread); knows which job runs where,
    so a cancelled job's generation can be aborted."""

    def __init__(self, engine, tokenizer, *, job_timeout: float, on_delta=None):
        """`on_delta(job, text)`, when given, receives the new text of jobs submitted with `stream: true`
        as the engine produces it, on the engine's loop (it must not block)."""
        self.engine, self.tokenizer, self.job_timeout = engine, tokenizer, job_timeout
        self.on_delta = on_delta
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
        streamed = None
        if request.get("stream") and self.on_delta is not None:
            def streamed(text: str, job=job) -> None:
                self.on_delta(job, text)
        return self.engine.submit(request_id(job), ids, sampling, cache_salt=str(job.get("tenant_id") or ""),
                                  on_delta=streamed)

    def _outcome(self, job: dict, generation: int, future, seconds: float) -> Outcome:
        try:
            completion = future.result()
        except EngineError as exc:
            if exc.kind is ErrorKind.ENGINE_DEAD:
                self._restart(generation)
            return Outcome(job, error=exc.job_error(), seconds=seconds)
        except Exception as exc:  # noqa: BLE001 - an engine failure nobody classified: worth another attempt
            log.exception("job %s: unrecognised engine failure", job["id"],
                          extra=job_fields(job["id"], job.get("attempt"), tenant=job.get("tenant_id")))
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


# --- What Flower shows ----------------------------------------------------------------------------
#
# celery-batches (0.11) runs a batch as one call in a pool thread and sends no task events for its
# messages (clokep/celery-batches#33, #70; upstream support, #104, is unreleased), so Flower, built from
# task events, never saw a generation (nor a route message): the GPU worker had processed 0 tasks. Here
# each message of a celery-batches task gets the events Celery sends for any task, from the worker's
# hostname: task-received when the worker takes it, task-started when its batch starts, and one ending.
# A generation ends when its job does in the batch core (uuid `job id:attempt`): task-succeeded with its
# runtime, task-retried for a retryable error (the job goes round again as its next attempt, or to its
# dead letter if it has none left) or task-failed; one that never reached the engine (its job was
# cancelled or superseded meanwhile, or its retrieval failed) ends task-revoked. A message of another
# batch task (route) ends with its batch: task-succeeded, or task-failed if the batch raised. For
# messages of a job (args: job id, attempt, …) `retries` is the job's attempt - 1.
#
# Cost: an event published alone costs ~0.25 ms of CPU (a PUBLISH through kombu), three per message. So
# the hot path only appends to a queue, and one thread publishes what queued every EVENT_FLUSH_SECONDS
# as one Celery `task.multi` message (a list of events, which event receivers take apart): ~0.03 ms per
# event. Events follow the worker's switch (`celery control enable_events / disable_events`). The timer
# thread may flush a batch while the consumer is still announcing its last message, so a task-received
# can follow its task-started; event receivers (Flower's too) merge it all the same.
#
# Worker processes load these handlers through the Celery app's `imports` (tasks.celery_app).

EVENT_FLUSH_SECONDS = 0.25


class EventOutbox:
    """Task events queued by any thread and published by one, each flush as one `task.multi` message
    per hostname. Best effort, like Celery's own events: an event the broker refuses is dropped."""

    def __init__(self, interval: float = EVENT_FLUSH_SECONDS):
        self.interval = interval
        self._events: deque = deque()
        self._lock = threading.Lock()
        self._app = None
        self._thread: threading.Thread | None = None

    def put(self, app, hostname: str, type_: str, **fields) -> None:
        fields.setdefault("timestamp", time.time())  # when it happened, not when it is published
        self._events.append((hostname, type_, fields))
        if self._thread is None:
            self._start(app)

    def _start(self, app) -> None:
        with self._lock:
            if self._thread is None:
                self._app = app
                self._thread = threading.Thread(target=self._run, name="task-events", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            by_host: dict[str, list] = defaultdict(list)
            while self._events:
                hostname, type_, fields = self._events.popleft()
                by_host[hostname].append((type_, fields))
            if not by_host:
                return
            try:
                with self._app.producer_pool.acquire(block=True) as producer:
                    for hostname, events in by_host.items():
                        dispatcher = self._app.events.Dispatcher(
                            producer.connection, hostname=hostname, channel=producer.channel,
                            buffer_while_offline=False, buffer_group=["task"], buffer_limit=len(events) + 1)
                        for type_, fields in events:
                            dispatcher.send(type_, **fields)
                        dispatcher.flush(errors=False)
            except Exception as exc:  # noqa: BLE001 - monitoring must never disturb the work
                log.warning("dropped %d task events: %r", sum(map(len, by_host.values())), exc)


class BatchEvents:
    """The task events of one running batch's messages."""

    def __init__(self, task, outbox: EventOutbox, requests):
        self.app, self.outbox, self.name = task.app, outbox, task.name
        self._open = {r.id: r for r in requests}
        self._started = time.monotonic()
        # A generation's outcome names its job: id and attempt, the generate task's arguments.
        self._by_job = ({(str(r.args[0]), int(r.args[1])): r for r in reversed(requests)}
                        if task.name == GENERATE_TASK else {})

    def started(self) -> None:
        for request in self._open.values():
            self._send(request, "task-started")

    def finished(self, outcome: Outcome) -> None:
        request = self._by_job.get((str(outcome.job["id"]), int(outcome.job["attempt"])))
        if request is None or self._open.pop(request.id, None) is None:
            return
        error, runtime = outcome.error, round(outcome.seconds, 6)
        if error is None:
            usage = outcome.result["usage"]
            self._send(request, "task-succeeded", runtime=runtime, result=repr(
                {"finish_reason": outcome.result["finish_reason"], "prompt_tokens": usage["prompt_tokens"],
                 "completion_tokens": usage["completion_tokens"]}))
        else:
            self._send(request, "task-retried" if error.retryable else "task-failed", runtime=runtime,
                       exception=f"{error.kind.value}: {error.message}", traceback="")

    def close(self, state: str) -> None:
        """The batch returned (state SUCCESS) or raised: end the messages that have not ended."""
        runtime = round(time.monotonic() - self._started, 6)
        for request in self._open.values():
            if state != states.SUCCESS:
                self._send(request, "task-failed", runtime=runtime, traceback="",
                           exception="its batch raised (see the worker's log)")
            elif self.name == GENERATE_TASK:
                self._send(request, "task-revoked", terminated=False, expired=False, signum=None,
                           reason="not generated: its job was cancelled or superseded, or retrieval failed")
            else:
                self._send(request, "task-succeeded", runtime=runtime,
                           result=f"'in a batch of {len(self._open)}'")
        self._open.clear()

    def _send(self, request, type_: str, **fields) -> None:
        # `retries` on every event, not only task-received: the task-sent of a message says 0 (Celery's
        # count) and, should it arrive late, would overwrite it.
        self.outbox.put(self.app, request.hostname, type_, uuid=request.id, retries=_retries(request),
                        **fields)


def _retries(request) -> int:
    """What Flower shows as a message's retries: its job's earlier attempts, for a job's messages."""
    if request.name in (GENERATE_TASK, ROUTE_TASK):  # args: job id, attempt, …
        return int(request.args[1]) - 1
    return (request.request_dict or {}).get("retries", 0)


_outbox = EventOutbox()
_running = threading.local()  # .batch: the BatchEvents of the batch this pool thread runs
_consumer = None  # the worker's consumer: its event dispatcher says whether task events are on


def _task_events_on() -> bool:
    dispatcher = getattr(_consumer, "event_dispatcher", None)
    return bool(dispatcher and dispatcher.enabled and (not dispatcher.groups or "task" in dispatcher.groups))


@signals.task_received.connect
def _on_received(sender=None, request=None, **_) -> None:
    """The consumer took a message (celery-batches' strategy sends this signal for each one it buffers)."""
    global _consumer
    if not isinstance(request.task, Batches):
        return  # Celery sends the events of other tasks itself
    _consumer = sender
    if _task_events_on():
        _outbox.put(sender.app, sender.hostname, "task-received", uuid=request.id, name=request.name,
                    args=request.argsrepr, kwargs=request.kwargsrepr, root_id=request.root_id,
                    parent_id=request.parent_id, retries=_retries(request),
                    eta=request.eta and request.eta.isoformat(),
                    expires=request.expires and request.expires.isoformat())


@signals.task_prerun.connect
def _on_batch_start(task=None, args=None, **_) -> None:
    """celery-batches starts a batch, in the pool thread that runs it: args is ([SimpleRequest, …],)."""
    if isinstance(task, Batches) and args and isinstance(args[0], list) and _task_events_on():
        _running.batch = BatchEvents(task, _outbox, args[0])
        _running.batch.started()


@signals.task_postrun.connect
def _on_batch_end(task=None, state=None, **_) -> None:
    batch = getattr(_running, "batch", None)
    if isinstance(task, Batches) and batch is not None:
        _running.batch = None
        batch.close(state)


@signals.worker_shutdown.connect
def _on_shutdown(**_) -> None:
    """The pool has finished its batches: publish their last events now, not never."""
    _outbox.flush()
