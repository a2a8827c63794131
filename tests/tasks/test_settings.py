"""Settings and Celery configuration that must hold together, read from what the processes really use.

The worker checks run an entry point's own `main()` (workers.gpu, workers.router) up to the moment it
would start consuming, and inspect the Celery worker it built (not started): the effective prefetch
its consumer would ask the broker for, the queues it would consume, its tasks' ack settings, and the
visibility timeout its broker channel applies. Non-default sizes are set in the environment, so that
a value that only happens to equal a default does not pass.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks.names import GENERATE_TASK, INGEST_QUEUE, INGEST_TASK, ROUTE_TASK, node_queue, route_queue
from tasks.routing.strategies import NAMES
from tasks.settings import Settings

NODE_ID = "config-test-node"
# Building a Celery worker as root (this sandbox) warns about superuser privileges; not the point here.
pytestmark = pytest.mark.filterwarnings("ignore::celery.exceptions.SecurityWarning")


class _NotStarted:
    def __init__(self, worker):
        self.worker = worker

    def start(self) -> None:  # main() returns at once instead of consuming
        pass


@pytest.fixture
def built_worker(monkeypatch, base_settings):
    """build(entry_module, **env) runs that entry point's main() with SWITCHYARD_* `env`, and returns
    (app, worker): the Celery app and the real, unstarted Celery worker main() built."""
    from celery.app import trace

    from tasks.celery_app import SwitchyardCelery

    built: dict = {}

    def worker_factory(app):
        def build(**options):
            worker = app.subclass_with_self("celery.apps.worker:Worker")(**options)
            built.update(app=app, worker=worker)
            return _NotStarted(worker)
        return build

    monkeypatch.setattr(SwitchyardCelery, "Worker", property(worker_factory))

    def build(module, **env):
        for name, value in {"DATABASE_URL": base_settings.database_url, "REDIS_URL": base_settings.redis_url,
                            "SWITCHYARD_MODEL_PATH": str(base_settings.resolved_model_path),
                            "SWITCHYARD_NODE_ID": NODE_ID, "SWITCHYARD_ENGINE": "simulated",
                            "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                            **{f"SWITCHYARD_{k.upper()}": str(v) for k, v in env.items()}}.items():
            monkeypatch.setenv(name, value)
        module.main()
        return built["app"], built["worker"]

    yield build
    if built:
        trace.reset_worker_optimizations(built["app"])
        built["worker"].pool.stop()
        if "db" in built["app"].__dict__:
            built["app"].db.close()
        built["app"].redis.close()


@pytest.fixture
def gpu_main(monkeypatch):
    """workers.gpu, with no heartbeat or cancel-listener thread left behind by its main()."""
    import workers.gpu as gpu

    monkeypatch.setattr(gpu, "_heartbeat_loop", lambda *args: None)
    monkeypatch.setattr(gpu, "_cancel_listener", lambda *args: None)
    return gpu


def _effective_prefetch(app, worker) -> float:
    """Messages the worker's consumer may hold unacknowledged, as Celery's consumer applies it."""
    if app.conf.worker_disable_prefetch:
        return 1
    limit = app.conf.worker_eta_task_limit
    count = worker.consumer.initial_prefetch_count
    return min(count, limit) if limit else count


@pytest.mark.parametrize("batch_size,batch_concurrency", [(32, 32), (7, 5), (3, 8), (1, 1)])
def test_gpu_worker_prefetch_covers_every_batch_in_flight(built_worker, gpu_main, batch_size,
                                                          batch_concurrency):
    app, worker = built_worker(gpu_main, batch_size=batch_size, batch_concurrency=batch_concurrency)
    settings = app.settings
    assert (settings.batch_size, settings.batch_concurrency) == (batch_size, batch_concurrency)
    prefetch = _effective_prefetch(app, worker)
    print(f"GPU worker, batches of {batch_size} x {batch_concurrency} at once: effective prefetch "
          f"{prefetch}, needed {settings.prefetch_count}")
    # Acks are late (after a batch ends): every batch that may be generating, plus one filling up.
    assert prefetch >= batch_size * (batch_concurrency + 1), prefetch
    assert prefetch <= settings.prefetch_count + batch_concurrency  # and not unbounded: the rounding only
    # One pool thread per batch that may generate at once, on this node's own queue only.
    assert worker.concurrency == batch_concurrency
    assert type(worker.pool).__module__ == "celery.concurrency.thread"
    assert set(app.amqp.queues.consume_from) == {node_queue(NODE_ID)}


@pytest.mark.parametrize("max_num_seqs", [256, 48])
def test_gpu_worker_runs_one_batch_thread_per_engine_seat_by_default(built_worker, gpu_main, max_num_seqs):
    """Jobs reach a node as its slots free, so batches are small: a thread per engine seat lets every
    seat fill. Its Postgres pool stays bounded however many threads there are."""
    app, worker = built_worker(gpu_main, max_num_seqs=max_num_seqs)
    assert app.settings.batch_concurrency == max_num_seqs
    assert worker.concurrency == max_num_seqs
    assert app.db.max_size == min(max_num_seqs, 32) + 4
    app.db.close()
    # An explicit SWITCHYARD_BATCH_CONCURRENCY still wins.
    assert Settings(max_num_seqs=max_num_seqs, batch_concurrency=7).batch_concurrency == 7


def test_gpu_worker_tasks_ack_late_and_reject_on_worker_loss(built_worker, gpu_main):
    app, _worker = built_worker(gpu_main)
    for name in (GENERATE_TASK, ROUTE_TASK):
        task = app.tasks[name]
        assert task.acks_late is True and task.reject_on_worker_lost is True, name


def test_router_consumes_every_route_queue_and_acks_late(built_worker, monkeypatch):
    import threading

    import workers.router as router

    monkeypatch.setattr(router, "reconcile_forever", lambda app: threading.Event())  # no sweeps here
    app, worker = built_worker(router)
    assert set(app.amqp.queues.consume_from) == {route_queue(s) for s in NAMES}
    route = app.tasks[ROUTE_TASK]
    assert route.acks_late is True and route.reject_on_worker_lost is True


def test_ingest_worker_consumes_only_its_queue_with_a_few_threads_and_the_model_loaded(built_worker):
    import workers.ingest_worker as ingest_worker
    from tasks.ingest.task import settings_embedder

    app, worker = built_worker(ingest_worker, ingest_concurrency=3)
    assert set(app.amqp.queues.consume_from) == {INGEST_QUEUE}
    assert worker.concurrency == 3 and type(worker.pool).__module__ == "celery.concurrency.thread"
    assert settings_embedder(app.settings)._model is not None  # loaded at boot, before the first document
    task = app.tasks[INGEST_TASK]
    assert task.acks_late is True and task.reject_on_worker_lost is True and task.queue == INGEST_QUEUE


def test_broker_redelivers_only_after_the_configured_visibility_timeout(built_worker, gpu_main):
    """The visibility timeout the Redis transport really applies (not the default 3600 s by accident),
    and longer than the longest job, or Redis redelivers a job that is still running."""
    app, _worker = built_worker(gpu_main, visibility_timeout=7300, job_timeout=7200)
    with app.connection_for_write() as conn:
        applied = conn.default_channel.visibility_timeout
    assert applied == 7300 > app.settings.job_timeout


def test_environment_is_read_by_from_env(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://a@b/c")
    monkeypatch.setenv("SWITCHYARD_BATCH_SIZE", "7")
    settings = Settings.from_env()
    assert settings.database_url == "postgresql://a@b/c" and settings.batch_size == 7


def test_the_embedded_broker_keeps_every_message(redis):
    """The Valkey that `make up` and the tests start: AOF on, and never evict (a dropped key is a lost job)."""
    assert redis.config_get("appendonly")["appendonly"] == "yes"
    assert redis.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


@pytest.mark.parametrize("drift,field", [
    ({"visibility_timeout": 600, "job_timeout": 900}, "visibility_timeout"),
    ({"visibility_timeout": 900, "job_timeout": 900}, "visibility_timeout"),  # equal is not enough
    ({"heartbeat_interval": 5, "heartbeat_ttl": 4}, "heartbeat_ttl"),
    ({"heartbeat_interval": 5, "heartbeat_ttl": 5}, "heartbeat_ttl"),
    ({"default_strategy": "random"}, "default_strategy"),
])
def test_a_drifted_configuration_is_refused(drift, field):
    with pytest.raises(ValidationError, match=field):
        Settings(**drift)


def test_a_consistent_configuration_is_accepted():
    """The control for the refusals above: the nearest consistent values pass."""
    Settings(visibility_timeout=901, job_timeout=900, heartbeat_interval=5, heartbeat_ttl=5.5,
             default_strategy="prefix_affinity")
