"""Serving the metrics: each Celery process on a port of its own, the API on `/metrics` across its
gunicorn workers (see tasks.metrics for why each process kind is served the way it is)."""

from __future__ import annotations

import logging
import os
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, make_wsgi_app

log = logging.getLogger(__name__)

#: the metrics port of each Celery process kind (the prefix of its worker hostname, `router@<id>`), when
#: SWITCHYARD_METRICS_PORT does not name one: distinct, so a whole cluster can share one host
ROLE_PORTS = {"router": 9101, "gpu": 9102, "webhooks": 9103, "ingest": 9104}
#: prometheus_client's own switch: set, values go to files in that folder (multiprocess mode)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def role_port(settings, role: str) -> int | None:
    """The port a process of kind `role` serves metrics on; None for none (SWITCHYARD_METRICS_PORT=0)."""
    port = settings.metrics_port if settings.metrics_port is not None else ROLE_PORTS.get(role)
    return port or None


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def text_format_only(app):
    """`app` answering in the Prometheus text format whatever the scraper prefers. prometheus_client
    (0.26) writes OpenMetrics sample names with `:` turned into `_` unless the scraper asks for UTF-8
    names (Prometheus 2.x does not), so vLLM's `vllm:generation_tokens_total` would be stored as
    `vllm_generation_tokens_total`; the text format keeps every name as registered."""

    def wrapped(environ, start_response):
        return app({**environ, "HTTP_ACCEPT": "text/plain; version=0.0.4"}, start_response)

    return wrapped


def start_server(port: int, addr: str, registry=REGISTRY) -> WSGIServer:
    """prometheus_client's start_http_server, in the text format only (text_format_only)."""
    httpd = make_server(addr, port, text_format_only(make_wsgi_app(registry)), _Server, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd


def serve(settings, role: str) -> int | None:
    """Serve this process's default registry over HTTP (a daemon thread); returns the port, or None.

    A port already taken (several workers of one kind on one host, each needs its own
    SWITCHYARD_METRICS_PORT) is logged and skipped: metrics never keep a worker from working."""
    port = role_port(settings, role)
    if port is None:
        return None
    try:
        start_server(port, settings.metrics_addr)
    except OSError as exc:
        log.warning("metrics: cannot listen on %s:%d (%s); this %s process exports no metrics (give each "
                    "process on a host its own SWITCHYARD_METRICS_PORT)", settings.metrics_addr, port, exc, role)
        return None
    log.info("metrics on http://%s:%d/metrics", settings.metrics_addr, port)
    return port


def on_worker_init(sender=None, **_kwargs) -> None:
    """Celery's `worker_init` signal (connected by tasks.celery_app): the process kind is its worker
    hostname's prefix (`router@…`, `gpu@…`, `webhooks@…`, `ingest@…`)."""
    settings = getattr(sender.app, "settings", None)
    if settings is not None:
        serve(settings, sender.hostname.split("@", 1)[0])


# --- the API ------------------------------------------------------------------------------------------


class _ThisProcess:
    """The default registry, as one collector of another registry (single-process mode)."""

    def collect(self):
        return REGISTRY.collect()


def api_exposition(state=None) -> tuple[bytes, str]:
    """The API's `/metrics` page: every gunicorn worker's metrics added up (multiprocess mode), or this
    process's own (a single process: the Flask test client, `flask run`), plus `state` (a collector of
    cluster state, tasks.metrics.state.StateCollector)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):  # the library's switch, read as the library reads it
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    if state is not None:
        registry.register(state)
    return generate_latest(registry), CONTENT_TYPE_LATEST

