"""Webhooks: the tenant's signing secret, a job's deliveries (with every attempt), manual re-sends, and
endpoints disabled by a 410."""

from __future__ import annotations

import uuid
from datetime import datetime

from flask import Blueprint, current_app, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.auth import authenticate
from api.errors import ApiError, validation_errors
from api.jobs import load_job
from api.paging import cursor_arg, limit_arg, page_response, status_arg
from tasks.batches.resource import batch_id
from tasks.webhooks import store as webhooks

bp = Blueprint("webhooks", __name__, url_prefix="/v1")
bp.before_request(authenticate)

MAX_OVERLAP_SECONDS = 7 * 86400


class RotateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_seconds: int | None = Field(None, ge=0, le=MAX_OVERLAP_SECONDS)


class EnableRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)


def _services():
    return current_app.extensions["switchyard"]


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _body(model: type[BaseModel]) -> BaseModel:
    data = request.get_json(silent=True) if request.get_data(cache=True) else {}
    if not isinstance(data, dict):
        raise ApiError(400, "Malformed JSON", "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = validation_errors(exc)
        raise ApiError(422, "Invalid request", "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                       errors=errors) from None


def secret_resource(current: dict, previous: list[dict]) -> dict:
    return {
        "object": "webhook_secret",
        "secret": current["secret"],
        "created_at": _ts(current["created_at"]),
        # Rotated-out secrets still sign (a second signature) until they expire.
        "previous": [{"created_at": _ts(p["created_at"]), "expires_at": _ts(p["expires_at"])} for p in previous],
    }


def delivery_resource(row: dict) -> dict:
    return {
        "id": str(row["id"]),  # the `webhook-id` header: the same on every attempt
        "object": "webhook_delivery",
        "job_id": str(row["job_id"]) if row["job_id"] else None,
        "batch_id": batch_id(row["batch_id"]) if row.get("batch_id") else None,  # a batch.* event's batch
        "event": row["event"],
        "url": row["url"],
        "status": row["status"],
        "attempt_count": row["attempts"],
        "next_attempt_at": _ts(row["next_attempt_at"]) if row["status"] == "pending" else None,
        "created_at": _ts(row["created_at"]),
        "delivered_at": _ts(row["delivered_at"]),
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "attempts": [{"attempt": a["attempt"], "started_at": _ts(a["started_at"]), "status_code": a["status_code"],
                      "latency_ms": a["latency_ms"], "error": a["error"]} for a in row.get("attempt_log", [])],
    }


# --- secret -------------------------------------------------------------------------------------


@bp.get("/webhooks/secret")
def get_secret():
    pool = _services().pool
    box = _services().secret_box
    return jsonify(secret_resource(webhooks.current_secret(pool, g.tenant.id, box),
                                   webhooks.previous_secrets(pool, g.tenant.id, box)))


@bp.post("/webhooks/secret/rotate")
def rotate_secret():
    body = _body(RotateRequest)
    services = _services()
    overlap = services.settings.webhook_secret_overlap if body.overlap_seconds is None else body.overlap_seconds
    current = webhooks.rotate_secret(services.pool, g.tenant.id, overlap, services.secret_box)
    return jsonify(secret_resource(current, webhooks.previous_secrets(services.pool, g.tenant.id, services.secret_box)))


# --- endpoints ----------------------------------------------------------------------------------


@bp.get("/webhooks/endpoints")
def list_endpoints():
    rows = webhooks.disabled_endpoints(_services().pool, g.tenant.id)
    return jsonify(object="list", data=[{"object": "webhook_endpoint", "url": r["url"], "disabled": True,
                                         "disabled_at": _ts(r["disabled_at"]), "disabled_reason": r["disabled_reason"]}
                                        for r in rows])


@bp.post("/webhooks/endpoints/enable")
def enable_endpoint():
    body = _body(EnableRequest)
    row = webhooks.enable_endpoint(_services().pool, g.tenant.id, body.url)
    if row is None:
        raise ApiError(404, "Not Found", f"no disabled endpoint {body.url!r}; GET /v1/webhooks/endpoints lists them")
    return jsonify(object="webhook_endpoint", url=row["url"], disabled=False)


# --- deliveries ---------------------------------------------------------------------------------


@bp.get("/webhooks/deliveries")
def list_all_deliveries():
    """Every delivery of the tenant, newest first; `?status=dead` lists the dead letters."""
    limit = limit_arg()
    rows = webhooks.list_deliveries(_services().pool, g.tenant.id, limit=limit + 1,
                                    status=status_arg(webhooks.DELIVERY_STATUSES), after=cursor_arg())
    return page_response(rows, limit, delivery_resource)


@bp.get("/jobs/<uuid:job_id>/deliveries")
def list_deliveries(job_id: uuid.UUID):
    load_job(job_id)
    rows = webhooks.deliveries_for_job(_services().pool, job_id, g.tenant.id)
    return jsonify(object="list", data=[delivery_resource(r) for r in rows])


@bp.post("/jobs/<uuid:job_id>/deliveries/<uuid:delivery_id>/retry")
def retry_delivery(job_id: uuid.UUID, delivery_id: uuid.UUID):
    pool = _services().pool
    load_job(job_id)
    current = webhooks.get_delivery(pool, delivery_id, job_id, g.tenant.id)
    if current is None:
        raise ApiError(404, "Not Found", f"job {job_id} has no delivery {delivery_id}")
    if current["disabled_at"] is not None:
        raise ApiError(409, "Conflict", f"the endpoint {current['url']} is disabled ({current['disabled_reason']}); "
                       "re-enable it with POST /v1/webhooks/endpoints/enable first")
    row = webhooks.retry_delivery(pool, delivery_id, job_id, g.tenant.id)
    if row is None:
        raise ApiError(409, "Conflict", f"delivery {delivery_id} is still pending; its next attempt is already "
                       "scheduled")
    response = jsonify(delivery_resource(row))
    response.status_code = 202
    return response
