# gunicorn settings for the API, from Switchyard's settings (SWITCHYARD_API_BIND, _API_WORKERS,
# _API_THREADS). Threads, not processes, carry concurrency: a long-poll (GET ?wait=N) holds its thread
# while it waits for the job's notification.
from tasks.settings import Settings

_settings = Settings.from_env()
bind = _settings.api_bind
workers = _settings.api_workers
worker_class = "gthread"
threads = _settings.api_threads
timeout = 90  # > the 60 s long-poll maximum
graceful_timeout = 30
accesslog = "-"
