"""Liveness and readiness probes."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify

from tasks.jobs import store
from tasks.routing import registry

bp = Blueprint("health", __name__)
log = logging.getLogger(__name__)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    """Ready when Redis and Postgres answer and at least one worker's heartbeat is live."""
    services = current_app.extensions["switchyard"]
    checks: dict[str, str] = {}
    nodes: list[dict] = []
    try:
        services.redis.ping()
        checks["redis"] = "ok"
        nodes = registry.live_nodes(services.redis)
        checks["workers"] = f"{len(nodes)} live" if nodes else "no live worker"
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none is fatal here
        log.warning("readiness: Redis unreachable: %r", exc)  # the details stay in the log
        checks["redis"] = "unreachable"
        checks["workers"] = "unknown (redis unreachable)"
    try:
        store.ping(services.pool)
        checks["postgres"] = "ok"
    except Exception as exc:  # noqa: BLE001
        log.warning("readiness: Postgres unreachable: %r", exc)
        checks["postgres"] = "unreachable"
    ready = checks["redis"] == "ok" and checks["postgres"] == "ok" and bool(nodes)
    response = jsonify(status="ready" if ready else "not ready", checks=checks)
    response.status_code = 200 if ready else 503
    return response
