"""GPU worker entry point: `python -m workers.gpu`.

Loads the engine in this (main, non-daemonic) process before consuming anything, then runs a Celery
worker on this node's own queue with the threads pool: vLLM starts its engine core with multiprocessing
spawn, which cannot happen inside a daemonic prefork child, and CUDA state does not survive fork.
"""

from __future__ import annotations

import logging
import math
import os
import threading

from tasks import notify, registry
from tasks.celery_app import create_celery
from tasks.settings import Settings

log = logging.getLogger("workers.gpu")


def _heartbeat_loop(app, runner, engine, stop: threading.Event) -> None:
    settings = app.settings
    while True:
        try:
            registry.heartbeat(app.redis, {
                "id": settings.node_id,
                "models": [settings.model_name],
                "batch_capacity": settings.batch_size * settings.batch_concurrency,
                "inflight": runner.inflight,
                "engine_state": engine.state,
                "engine_restarts": engine.restarts,
                "supports_seed": engine.supports_seed,
                "pid": os.getpid(),
            }, settings.heartbeat_ttl)
        except Exception:  # noqa: BLE001 - a Redis blip must not stop the heartbeats for good
            log.exception("heartbeat failed")
        if stop.wait(settings.heartbeat_interval):
            return


def _cancel_listener(app, runner) -> None:
    """Abort generations whose jobs were cancelled through the API."""
    while True:
        try:
            pubsub = app.redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(notify.CANCEL_CHANNEL)
            for message in pubsub.listen():
                if message["type"] == "message":
                    runner.abort(message["data"].decode())
        except Exception:  # noqa: BLE001
            log.exception("cancel subscription lost; renewing")
            threading.Event().wait(1)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env().require_urls()
    # The CPU backend otherwise wants 92 % of a memory node free and refuses to start.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from tasks.prompting import load_tokenizer
    from workers.batch import BatchRunner
    from workers.engine import VllmEngine

    engine = VllmEngine(str(settings.resolved_model_path), max_model_len=settings.max_model_len,
                        enforce_eager=settings.enforce_eager, max_num_seqs=settings.max_num_seqs)
    engine.start()
    app = create_celery(settings)
    runner = BatchRunner(settings=settings, pool=app.db, redis=app.redis, celery=app, engine=engine,
                         tokenizer=load_tokenizer(settings.resolved_model_path))
    app.batch_runner = runner
    stop = threading.Event()
    threading.Thread(target=_heartbeat_loop, args=(app, runner, engine, stop), daemon=True, name="heartbeat").start()
    threading.Thread(target=_cancel_listener, args=(app, runner), daemon=True, name="cancels").start()
    try:
        worker = app.Worker(
            hostname=f"gpu@{settings.node_id}",
            queues=[registry.node_queue(settings.node_id)],
            pool="threads",
            concurrency=settings.batch_concurrency,
            # prefetch = multiplier x concurrency; acks are late, so it must cover every batch in flight.
            prefetch_multiplier=math.ceil(settings.prefetch_count / settings.batch_concurrency),
            loglevel="INFO",
        )
        worker.start()
    finally:
        stop.set()
        registry.deregister(app.redis, settings.node_id)
        engine.shutdown()


if __name__ == "__main__":
    main()
