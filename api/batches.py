"""/v1/batches: OpenAI's Batch API. A batch runs every request of an uploaded JSONL file (POST /v1/files)
against one endpoint (/v1/chat/completions or /v1/completions) within its completion window ("24h"),
as jobs of priority `batch`: they wait in the fair queue behind interactive jobs and fill the fleet's
spare capacity. The official `openai` client's `batches.create` / `retrieve` / `list` / `cancel` work
unmodified.

Creating a batch checks every line the way its endpoint checks a request (api/openai.py, then the job
validation of api/jobs.py: model, context length, ...). A file with bad lines makes a `failed` batch
whose `errors.data` names each line and what to fix, and runs nothing; a good one becomes its jobs and
the batch, in one transaction, and the jobs join the fair queue together. The reconciler ends a batch
(tasks/batches/progress.py): `completed` once every line has finished, `expired` at the end of its
window (with what finished), `cancelled` after POST /v1/batches/{id}/cancel (with what finished).

Limits: creating a batch is one submission (one token of the tenant's submit rate); its lines are not
charged to the submit rate or the output-token rate (they are paced by the fair queue instead), but they
count toward the tenant's unfinished jobs and their prompt tokens (max_active_jobs,
max_queued_prompt_tokens): a batch that would pass either fails with `active_jobs_limit_exceeded` or
`token_limit_exceeded`, and runs nothing.

Webhooks: a batch whose metadata has `webhook_url` (checked by the SSRF guard) gets a signed
`batch.completed`, `batch.failed`, `batch.expired` or `batch.cancelled` event there when it ends, in
OpenAI's event shape, signed with the tenant's secret like job webhooks.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated, Literal

import redis
from flask import Blueprint, current_app, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from api.auth import authenticate
from api.errors import ApiError, validation_errors
from api.files import after_arg, page, use_openai_errors
from api.jobs import validate_job
from api.openai import OpenAIError, endpoint_job
from tasks.batches import lines, store
from tasks.batches.resource import BATCH_PREFIX, FILE_PREFIX, OPEN, WINDOWS, batch_resource, parse_id
from tasks.errors import TRANSIENT
from tasks.jobs import store as jobs_store
from tasks.routing.task import enqueue_many
from tasks.webhooks import ssrf

log = logging.getLogger(__name__)

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")
bp.before_request(authenticate)
use_openai_errors(bp)

#: the metadata key naming where the batch's webhook events go
WEBHOOK_KEY = "webhook_url"
_YIELD_EVERY = 50  # lines checked between yields to the API's other requests (gevent)

MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class BatchRequest(BaseModel):
    """Body of POST /v1/batches (OpenAI's)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=100)
    endpoint: Literal[lines.ENDPOINTS]
    completion_window: Literal[WINDOWS]
    # Up to 16 pairs, as OpenAI's; `webhook_url` also says where the batch's webhook events go.
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)


def _services():
    return current_app.extensions["switchyard"]


def _request_body() -> BatchRequest:
    try:
        body = json.loads(request.get_data(cache=False) or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    return BatchRequest.model_validate(body)  # a ValidationError answers 400 naming the field


def _webhook_url(metadata: dict | None) -> str | None:
    url = (metadata or {}).get(WEBHOOK_KEY)
    if url is None:
        return None
    try:
        ssrf.check_url(url, ssrf.AllowList.parse(_services().settings.webhook_allow))
    except ssrf.UnsafeURL as exc:
        raise OpenAIError(400, f"metadata.{WEBHOOK_KEY}: {exc}", f"metadata.{WEBHOOK_KEY}") from None
    return url.strip()


def _line_error(number: int, exc: Exception) -> lines.LineError:
    """What a request body's check said, as a batch error on its line (`param` inside the line)."""
    if isinstance(exc, OpenAIError):
        return lines.LineError(number, exc.code or "invalid_request", exc.message,
                               f"body.{exc.param}" if exc.param else "body")
    if isinstance(exc, ApiError):
        field = (exc.extra.get("errors") or [{}])[0].get("field")
        return lines.LineError(number, "model_not_found" if exc.title == "Unknown model" else "invalid_request",
                               exc.detail, f"body.{field}" if field else "body")
    errors = validation_errors(exc)
    return lines.LineError(number, "invalid_request", "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                           f"body.{errors[0]['field']}" if errors else "body")


def prepare_lines(content: bytes, endpoint: str) -> list[dict]:
    """Every request of a batch file as the job it runs (tasks.jobs.store.insert_jobs' columns, less id
    and batch_id); lines.BadFile naming each bad line and what to fix."""
    settings = _services().settings
    jobs, errors = [], []
    for i, line in enumerate(lines.parse(content, settings.batch_max_lines)):
        if i % _YIELD_EVERY == 0:
            time.sleep(0)  # under gevent: let this process's other requests run while a large file is checked
        if line.url != endpoint:
            errors.append(lines.LineError(line.number, "invalid_url", f"`url` is {line.url} but the batch runs "
                                          f"{endpoint}; every line must name the batch's endpoint", "url"))
            continue
        if line.body.get("stream"):
            errors.append(lines.LineError(line.number, "invalid_request", "`stream` is not available in a batch "
                                          "(results go to the output file); remove it", "body.stream"))
            continue
        try:
            job = validate_job({**endpoint_job(endpoint, line.body), "priority": "batch"})
        except (OpenAIError, ApiError, ValidationError) as exc:
            errors.append(_line_error(line.number, exc))
            continue
        jobs.append({"tenant_id": g.tenant.id, "model": job["model"], "routing_strategy": job["strategy"],
                     "priority": job["priority"], "request": job["request"], "metadata": job["metadata"],
                     "max_attempts": job["max_attempts"], "session_id": job["session_id"],
                     "affinity_key": job["affinity_key"], "batch_line": line.number, "custom_id": line.custom_id})
    if errors:
        raise lines.BadFile(errors[:lines.MAX_ERRORS], more=max(0, len(errors) - lines.MAX_ERRORS))
    return jobs


def _check_limits(jobs: list[dict]) -> None:
    """The batch's lines fit in the tenant's caps on unfinished jobs and the prompt tokens they hold."""
    settings, limits = _services().settings, g.tenant.limits
    max_jobs = limits.get("max_active_jobs", settings.tenant_max_active_jobs)
    max_tokens = limits.get("max_queued_prompt_tokens", settings.tenant_max_queued_prompt_tokens)
    active, held = jobs_store.active_load(_services().pool, g.tenant.id)
    tokens = sum(j["request"]["prompt_tokens"] for j in jobs)
    if active + len(jobs) > max_jobs:
        raise lines.BadFile([lines.LineError(None, "active_jobs_limit_exceeded", f"this tenant has {active} "
                             f"unfinished jobs; with the batch's {len(jobs)} requests that passes its limit of "
                             f"{max_jobs}: send a smaller batch, or one after some jobs have finished")])
    if held + tokens > max_tokens:
        raise lines.BadFile([lines.LineError(None, "token_limit_exceeded", f"this tenant's unfinished jobs hold "
                             f"{held} prompt tokens; with the batch's {tokens} that passes its limit of "
                             f"{max_tokens}: send a smaller batch, or one after some jobs have finished")])


def _answer(row: dict, counts: dict | None = None):
    response = jsonify(batch_resource(row, counts))
    response.headers.update(g.get("rate_headers") or {})
    return response


@bp.post("")
def create():
    """Create a batch from an uploaded JSONL file (purpose `batch`) of requests to one endpoint."""
    services = _services()
    body = _request_body()
    with services.pool.connection() as conn:
        file_id = parse_id(body.input_file_id, FILE_PREFIX)
        file = store.get_file(conn, file_id, g.tenant.id, content=True) if file_id else None
    if file is None:
        raise OpenAIError(404, f"no file {body.input_file_id!r}; upload the batch's input with POST /v1/files",
                          "input_file_id", "not_found")
    if file["purpose"] != "batch":
        raise OpenAIError(400, f"file {body.input_file_id} has purpose {file['purpose']!r}; a batch's input must "
                          "be uploaded with purpose `batch`", "input_file_id")
    batch = {"tenant_id": g.tenant.id, "endpoint": body.endpoint, "input_file_id": file_id,
             "window": body.completion_window, "window_seconds": services.settings.batch_window_seconds,
             "metadata": body.metadata, "webhook_url": _webhook_url(body.metadata)}
    settings, limits = services.settings, g.tenant.limits
    g.rate_headers = services.submit_rate.take(g.tenant.id, limits.get("submit_rate", settings.tenant_submit_rate),
                                               limits.get("submit_burst", settings.tenant_submit_burst))
    try:
        jobs = prepare_lines(bytes(file["content"]), body.endpoint)
        _check_limits(jobs)
    except lines.BadFile as exc:
        with services.pool.connection() as conn:
            row = store.create_failed_batch(conn, [e.as_json() for e in exc.errors], **batch)
        return _answer(row)
    with services.pool.connection() as conn:
        row, inserted = store.create_batch(conn, jobs, **batch)
    try:
        enqueue_many(services.celery, inserted)
    except (*TRANSIENT, redis.RedisError) as exc:  # stored: the reconciler publishes them once overdue
        log.warning("batch %s: its jobs could not join the fair queue now (%r); the reconciler will publish them",
                    row["id"], exc)
    return _answer(row, {"total": len(inserted), "completed": 0, "failed": 0})


def load_batch(public_id: str) -> dict:
    """The caller's batch, or 404 (another tenant's batch looks exactly like a missing one)."""
    batch_id = parse_id(public_id, BATCH_PREFIX)
    row = None
    if batch_id is not None:
        with _services().pool.connection() as conn:
            row = store.get_batch(conn, batch_id, g.tenant.id)
    if row is None:
        raise OpenAIError(404, f"no batch {public_id!r}", code="not_found")
    return row


def _counts(rows: list[dict]) -> dict:
    """Live request counts of the open batches among `rows`."""
    with _services().pool.connection() as conn:
        return store.live_counts(conn, [r["id"] for r in rows if r["status"] in OPEN])


@bp.get("/<batch_id>")
def get(batch_id: str):
    """A batch, with its request counts as they are now."""
    row = load_batch(batch_id)
    return _answer(row, _counts([row]).get(row["id"]))


@bp.get("")
def list_():
    """The tenant's batches, newest first; `limit` (1–100, default 20), `after`."""
    raw = request.args.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise OpenAIError(400, f"`limit` must be an integer from 1 to 100, got {raw!r}", "limit")
    limit = int(raw)
    with _services().pool.connection() as conn:
        rows = store.list_batches(conn, g.tenant.id, limit=limit + 1, after=after_arg(BATCH_PREFIX))
    counts = _counts(rows[:limit])
    return page(rows, limit, lambda r: batch_resource(r, counts.get(r["id"])))


@bp.post("/<batch_id>/cancel")
def cancel(batch_id: str):
    """Cancel a batch: `cancelling` now; its unfinished lines are cancelled and it ends `cancelled`, with
    what had finished, within a reconciler sweep."""
    row = load_batch(batch_id)
    with _services().pool.connection() as conn:
        cancelled = store.mark_cancelling(conn, row["id"], g.tenant.id)
    if cancelled is None:
        current = load_batch(batch_id)
        if current["status"] == "cancelling":
            return _answer(current, _counts([current]).get(current["id"]))
        raise OpenAIError(409, f"batch {batch_id} is {current['status']}; only a batch in progress can be cancelled",
                          code="batch_not_cancellable")
    return _answer(cancelled, _counts([cancelled]).get(cancelled["id"]))
