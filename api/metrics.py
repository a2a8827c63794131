"""The API's metrics: every request timed by route, method and status (Flask hooks), and GET /metrics.

`/metrics` adds up every gunicorn worker's numbers (multiprocess mode, see ops/gunicorn.conf.py) and
adds the cluster's state (queue depths, active jobs, dead letters, nodes), read from Redis and Postgres
as it is scraped (tasks.metrics.state). It needs no key, like /healthz: Prometheus scrapes it, and it
shows counts and node ids, nothing of any tenant.
"""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, current_app, g, request

from tasks import metrics
from tasks.metrics.exposition import api_exposition

bp = Blueprint("metrics", __name__)

#: endpoints that always wait for their job (an OpenAI-style completion is answered when the job ends)
_WAITING_ENDPOINTS = {"openai.chat_completions", "openai.completions"}
_UNMATCHED = "<unmatched>"  # a path no route matches: one label value, however many paths clients try


@bp.get("/metrics")
def scrape():
    body, content_type = api_exposition(current_app.extensions["switchyard"].state)
    return Response(body, content_type=content_type)


def _waits() -> bool:
    """Whether the request may wait for a job: a long-poll, a submit with Prefer: wait, a completion."""
    if request.endpoint in _WAITING_ENDPOINTS or "wait=" in request.headers.get("Prefer", ""):
        return True
    try:
        return float(request.args.get("wait") or 0) > 0
    except ValueError:
        return False


def _start() -> None:
    g.metrics_started = time.perf_counter()
    g.metrics_route = request.url_rule.rule if request.url_rule is not None else _UNMATCHED
    metrics.http_requests_in_progress.labels(request.method, g.metrics_route).inc()


def _observe(response: Response) -> Response:
    started = g.get("metrics_started")
    if started is not None:
        metrics.observe_request(request.method, g.metrics_route, response.status_code, _waits(),
                                time.perf_counter() - started)
    return response


def _end(_exc) -> None:
    if g.get("metrics_started") is not None:
        metrics.http_requests_in_progress.labels(request.method, g.metrics_route).dec()


def instrument(app: Flask) -> None:
    """Time every request of `app` (error answers included: Flask runs after_request for them too)."""
    app.before_request(_start)
    app.after_request(_observe)
    app.teardown_request(_end)
    app.register_blueprint(bp)
