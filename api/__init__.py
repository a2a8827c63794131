"""The Switchyard HTTP API: a Flask app factory. Importing this package opens no connection."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from flask import Flask

from tasks.settings import Settings


@dataclass
class Services:
    """Per-process handles, opened on first use (gunicorn forks after the app module is imported)."""

    settings: Settings

    @cached_property
    def pool(self):
        from tasks.db import make_pool

        return make_pool(self.settings.database_url, max_size=20, name="api", timeout=5)

    @cached_property
    def redis(self):
        import redis

        return redis.Redis.from_url(self.settings.redis_url, socket_timeout=5, socket_connect_timeout=2)

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
        """The embedding model for collections and search queries; its weights load on first use."""
        from tasks.ingest.task import settings_embedder

        return settings_embedder(self.settings)

    @cached_property
    def waiter(self):
        from api.waiter import JobWaiter

        return JobWaiter(self.settings.redis_url)


def create_app(settings: Settings | None = None) -> Flask:
    from api.collections import bp as collections_bp
    from api.dead_letters import bp as dead_letters_bp
    from api.documents import bp as documents_bp
    from api.errors import register_error_handlers
    from api.health import bp as health_bp
    from api.jobs import bp as jobs_bp
    from api.nodes import bp as nodes_bp
    from api.webhooks import bp as webhooks_bp

    settings = settings or Settings.from_env().require_urls()
    app = Flask("switchyard")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["switchyard"] = Services(settings)
    register_error_handlers(app)
    app.register_blueprint(health_bp)
    app.register_blueprint(jobs_bp)
    app.register_blueprint(nodes_bp)
    app.register_blueprint(dead_letters_bp)
    app.register_blueprint(webhooks_bp)
    app.register_blueprint(collections_bp)
    app.register_blueprint(documents_bp)
    return app
