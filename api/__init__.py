"""The Switchyard HTTP API: a Flask app factory. Importing this package opens no connection."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from flask import Flask

from tasks.settings import Settings


class cached_property:  # noqa: N801 - used as functools.cached_property is
    """functools.cached_property, locked with the instance's own lock. functools' lock is made when
    functools is imported, before gunicorn's gevent worker patches threading, so it is a native lock
    that every greenlet (all in one OS thread) passes: hundreds of requests arriving at once would each
    open a connection pool of their own."""

    def __init__(self, func):
        self.func, self.name, self.__doc__ = func, func.__name__, func.__doc__

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        with instance.lock:
            if self.name not in instance.__dict__:
                instance.__dict__[self.name] = self.func(instance)
        return instance.__dict__[self.name]


def _under_gevent() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("threading")


class ThreadedEmbedder:
    """An Embedder whose model work (loading, embedding) runs in gevent's pool of native threads: a
    search embeds its query for tens of milliseconds of CPU (seconds to load the model), and on the
    gevent worker's one thread that would stall every other request it serves, /healthz included.
    PyTorch releases the GIL while it computes, so the greenlets go on meanwhile."""

    def __init__(self, embedder):
        self._embedder = embedder

    def __getattr__(self, name):
        return getattr(self._embedder, name)

    def _in_thread(self, fn, *args):
        import gevent

        return gevent.get_hub().threadpool.apply(fn, args)

    def load(self):
        return self._in_thread(self._embedder.load)

    @property
    def dimension(self) -> int:
        self.load()
        return self._embedder.dimension

    def embed_queries(self, texts: list[str]) -> list[list[float]]:
        return self._in_thread(self._embedder.embed_queries, texts)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._in_thread(self._embedder.embed_documents, texts)


@dataclass
class Services:
    """Per-process handles, opened on first use (gunicorn forks after the app module is imported)."""

    settings: Settings
    # Made with the Services (after gevent's patching, in a gunicorn worker): greenlet-aware there.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def warm_up(self) -> None:
        """Open what every request needs and load the tokenizer, before the first request arrives
        (gunicorn's post_worker_init): the first submit to a worker must not pay seconds for them."""
        self.pool, self.redis, self.celery, self.tokenizer  # noqa: B018 - each opens on first access

    @cached_property
    def pool(self):
        from tasks.db import make_pool

        # 20 connections per worker; a request waits 5 s at most for one
        # (a Postgres outage answers 503 + Retry-After then, rather than holding clients).
        return make_pool(self.settings.database_url, max_size=20, name="api", timeout=5)

    @cached_property
    def redis(self):
        import redis

        # A bounded, blocking pool: under gevent thousands of requests may want Redis at the same
        # moment; they queue for one of these connections instead of each opening its own.
        pool = redis.BlockingConnectionPool.from_url(self.settings.redis_url, max_connections=256, timeout=10,
                                                     socket_timeout=5, socket_connect_timeout=2)
        return redis.Redis(connection_pool=pool)

    @cached_property
    def celery(self):
        """The Celery app the lifecycle works through, sharing this process's pool and Redis client."""
        from tasks.celery_app import create_celery

        app = create_celery(self.settings)
        app.db, app.redis = self.pool, self.redis
        return app

    @cached_property
    def tokenizer(self):
        from tasks.prompting import load_tokenizer

        return load_tokenizer(self.settings.resolved_model_path)

    @cached_property
    def embedder(self):
        """The embedding model for collections and search queries; its weights load on first use. Under
        gevent its work runs in a native thread (ThreadedEmbedder), never on the one the greenlets share."""
        from tasks.ingest.task import settings_embedder

        embedder = settings_embedder(self.settings)
        return ThreadedEmbedder(embedder) if _under_gevent() else embedder

    @cached_property
    def waiter(self):
        from api.waiter import JobWaiter

        return JobWaiter(self.settings.redis_url)

    @cached_property
    def secret_box(self):
        from tasks.webhooks.sealing import SecretBox

        return SecretBox(self.settings.secrets_key)

    @cached_property
    def submit_rate(self):
        from api.limits import SubmitRate

        return SubmitRate(self.redis)

    @cached_property
    def state(self):
        """The cluster's state for GET /metrics, read through this process's Redis and Postgres pools."""
        from tasks.metrics.state import StateCollector

        return StateCollector(self.redis, self.pool)

    @cached_property
    def wait_slots(self):
        from api.limits import WaitSlots

        return WaitSlots(self.redis, self.settings.max_waits_per_tenant)


def create_app(settings: Settings | None = None) -> Flask:
    from api.admin import bp as admin_bp
    from api.admission import Admission
    from api.batches import bp as batches_bp
    from api.collections import bp as collections_bp
    from api.dead_letters import bp as dead_letters_bp
    from api.documents import bp as documents_bp
    from api.errors import register_error_handlers
    from api.files import bp as files_bp
    from api.health import bp as health_bp
    from api.jobs import bp as jobs_bp
    from api.metrics import instrument
    from api.nodes import bp as nodes_bp
    from api.openai import bp as openai_bp
    from api.openapi import bp as openapi_bp
    from api.webhooks import bp as webhooks_bp

    settings = settings or Settings.from_env().require_urls()
    app = Flask("switchyard")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["switchyard"] = Services(settings)
    register_error_handlers(app)
    instrument(app)  # first: every request is timed, whatever a blueprint's own hooks answer
    app.register_blueprint(health_bp)
    app.register_blueprint(jobs_bp)
    app.register_blueprint(nodes_bp)
    app.register_blueprint(dead_letters_bp)
    app.register_blueprint(webhooks_bp)
    app.register_blueprint(collections_bp)
    app.register_blueprint(documents_bp)
    app.register_blueprint(openai_bp)
    app.register_blueprint(files_bp)
    app.register_blueprint(batches_bp)
    app.register_blueprint(openapi_bp)
    app.register_blueprint(admin_bp)
    app.wsgi_app = Admission(app.wsgi_app, settings.api_active_requests)
    return app
