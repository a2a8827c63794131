"""/v1/dead-letters: jobs that used up their attempts, and replaying them.

A tenant's key sees its own; an admin key sees every tenant's."""

from __future__ import annotations

import uuid

from flask import Blueprint, current_app, g, jsonify, request

from api.auth import authenticate
from api.errors import ApiError
from api.limits import count_replay
from api.paging import limit_arg
from tasks.jobs import dead_letters, lifecycle
from tasks.jobs.resource import timestamp

bp = Blueprint("dead_letters", __name__, url_prefix="/v1/dead-letters")
bp.before_request(authenticate)


def _scope():
    return None if g.tenant.is_admin else g.tenant.id


def dead_letter_resource(row: dict) -> dict:
    return {
        "id": str(row["id"]),
        "object": "dead_letter",
        "job_id": str(row["job_id"]),
        "tenant_id": str(row["tenant_id"]),
        "reason": row["reason"],
        "attempts": row["attempts"],
        "last_error": row["last_error"],
        "created_at": timestamp(row["created_at"]),
        "replayed_at": timestamp(row["replayed_at"]),
    }


@bp.get("")
def list_():
    limit = limit_arg(default=100, maximum=1000)
    include_replayed = request.args.get("include_replayed", "false").lower() in ("1", "true", "yes")
    rows = dead_letters.list_dead_letters(current_app.extensions["switchyard"].pool, _scope(), limit=limit,
                                   include_replayed=include_replayed)
    return jsonify(object="list", data=[dead_letter_resource(r) for r in rows])


@bp.post("/<uuid:letter_id>/replay")
def replay(letter_id: uuid.UUID):
    """Send the job round again as a new attempt, with a fresh budget of attempts."""
    services = current_app.extensions["switchyard"]
    count_replay(services.redis, g.tenant.id,
                 g.tenant.limits.get("replays_per_day", services.settings.tenant_replays_per_day))
    job = lifecycle.replay(current_app.extensions["switchyard"].celery, letter_id, _scope())
    if job is None:
        raise ApiError(404, "Not Found", f"no unreplayed dead letter {letter_id}")
    return jsonify(object="replay", dead_letter_id=str(letter_id), job_id=str(job["id"]), attempt=job["attempt"]), 202
