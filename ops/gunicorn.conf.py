# gunicorn settings for the API, from Switchyard's settings (SWITCHYARD_API_BIND, _API_WORKERS,
# _API_WORKER_CONNECTIONS). gevent workers, as Flask's deployment docs advise for many long-lived
# connections: a long-poll (GET ?wait=N) is a parked greenlet, not a held thread, so thousands of them
# cost memory only and a submit or a health check never queues behind them. gunicorn monkey-patches
# each worker before it loads the app; psycopg (>= 3.1.14) and redis-py cooperate with gevent.
#
# Metrics: each worker is a process of its own, so prometheus_client runs in multiprocess mode: every
# worker writes its values to files in one folder and GET /metrics (on any worker) adds them up. The
# library picks the mode when it is first imported, in each worker after the fork, from
# PROMETHEUS_MULTIPROC_DIR: so it is set here, in the master, before anything imports it (tasks.settings
# does not), and the folder is emptied when the server starts.
import gc
import os
import resource
import shutil
import tempfile
from pathlib import Path

from tasks.settings import Settings

_settings = Settings.from_env()
# SWITCHYARD_METRICS_DIR, else a fresh folder of this server's own (removed when it exits).
_metrics_dir = _settings.metrics_dir or Path(tempfile.mkdtemp(prefix="switchyard-api-metrics-"))
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)
bind = _settings.api_bind
workers = _settings.api_workers
worker_class = "gevent"
worker_connections = _settings.api_worker_connections
backlog = 4096  # connections the kernel queues before accept (capped by net.core.somaxconn)
timeout = 90  # the worker's own heartbeat to the master (a waiting greenlet does not block it)
# An idle keep-alive connection is kept this long (gunicorn's default is 2 s). A busy client often sends
# its next request (the next long-poll, the next poll) more than 2 s after the last answer; closing the
# connection meanwhile races that request, and the client sees the connection dropped under it.
keepalive = 75
# On a restart, requests in flight get this long to finish: long-polls (≤ 60 s) do; an OpenAI-style
# completion (up to 590 s) may be cut, and its client then reads the job by the id it was given.
graceful_timeout = 65
accesslog = "-"


def on_starting(_server):
    # Files left by an earlier server would be added to this one's counts (and its gauges kept).
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    for leftover in _metrics_dir.iterdir():
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    # Every waiting client holds a socket: lift the soft open-files limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 16 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def post_worker_init(worker):
    # Each worker (after fork and gevent's patching) opens its pools and loads the tokenizer now.
    from tasks.logs import configure

    configure(_settings.log_format)
    worker.wsgi.extensions["switchyard"].warm_up()
    # Everything loaded so far (Flask, pydantic models, the tokenizer, the pools) lives as long as the
    # worker: frozen, it is no longer re-scanned by every full collection, which pauses every greenlet
    # of the worker at once (measured here before freezing: 50-60 ms idle, up to 0.3 s while 10,000
    # long-polls arrived). What is left to scan is the requests' own objects.
    gc.freeze()


def child_exit(_server, worker):
    # A worker that exited (restarted, killed): its live gauges go; its counters and histograms stay
    # counted, as a counter must never go down.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, str(_metrics_dir))


def on_exit(_server):
    if _settings.metrics_dir is None:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
