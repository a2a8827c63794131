"""Settings and Celery configuration that must hold together."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from tasks.celery_app import create_celery
from tasks.settings import Settings


def test_visibility_timeout_must_exceed_the_longest_job():
    with pytest.raises(ValidationError, match="visibility_timeout"):
        Settings(visibility_timeout=600, job_timeout=900)


def test_celery_reliability_settings():
    settings = Settings(redis_url="redis://127.0.0.1:1/0", database_url="postgresql://x@127.0.0.1:1/x")
    conf = create_celery(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.broker_transport_options["visibility_timeout"] == settings.visibility_timeout > settings.job_timeout
    assert conf.result_backend_transport_options["visibility_timeout"] == settings.visibility_timeout
    # The GPU worker's prefetch covers every batch that may generate at once plus one being buffered.
    assert settings.prefetch_count >= settings.batch_size * (settings.batch_concurrency + 1)
    assert math.ceil(settings.prefetch_count / settings.batch_concurrency) * settings.batch_concurrency \
        >= settings.prefetch_count


def test_environment_is_read_by_from_env(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://a@b/c")
    monkeypatch.setenv("SWITCHYARD_BATCH_SIZE", "7")
    settings = Settings.from_env()
    assert settings.database_url == "postgresql://a@b/c" and settings.batch_size == 7


def test_the_embedded_broker_keeps_every_message(redis):
    """The Valkey that `make up` and the tests start: AOF on, and never evict (a dropped key is a lost job)."""
    assert redis.config_get("appendonly")["appendonly"] == "yes"
    assert redis.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def test_a_drifted_configuration_is_refused():
    with pytest.raises(ValidationError, match="heartbeat_ttl"):
        Settings(heartbeat_interval=5, heartbeat_ttl=4)
    with pytest.raises(ValidationError, match="default_strategy"):
        Settings(default_strategy="random")
