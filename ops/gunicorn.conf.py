# gunicorn settings for the API. Threads, not processes, carry concurrency: a long-poll (GET ?wait=N)
# holds its thread while it waits for the job's notification.
import os

bind = os.environ.get("SWITCHYARD_API_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("SWITCHYARD_API_WORKERS", "2"))
worker_class = "gthread"
threads = int(os.environ.get("SWITCHYARD_API_THREADS", "64"))
timeout = 90  # > the 60 s long-poll maximum
graceful_timeout = 30
accesslog = "-"
