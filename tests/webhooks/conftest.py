"""Webhook fixtures: a real HTTP receiver on loopback (allow-listed), an internal canary server that must
never be reached, two real webhooks worker processes (`python -m workers.webhook_worker`, each with its
dispatcher) on the session's Postgres and Valkey, and the API in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from api import create_app
from ops.services import free_port
from tasks.jobs import store
from tasks.celery_app import create_celery
from tasks.jobs.status import JobStatus

REPO = Path(__file__).resolve().parents[2]
# Compressed back-off for the tests: 6 attempts over ~9 s (production: 9 over ~27 h).
SCHEDULE = (0.3, 0.6, 1.2, 2.4, 4.8)
JITTER = 0.1
WORKERS = 2


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def event(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server that records every request and answers as scripted per path (default 200)."""

    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    scripts: dict[str, list[tuple[int, dict]]] = field(default_factory=dict)
    changed: threading.Condition = field(default_factory=threading.Condition)
    server: ThreadingHTTPServer | None = None

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._record(body)

            def do_GET(self):  # noqa: N802
                self._record(b"")

            def _record(self, body: bytes):
                item = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
                with receiver.changed:
                    receiver.requests.append(item)
                    script = receiver.scripts.get(self.path)
                    status, headers = script.pop(0) if script else (200, {})
                    receiver.changed.notify_all()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default backlog (5) drops SYNs under load: 1 s retransmits

        self.server = Server((self.host, self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def script(self, path: str, *answers: tuple[int, dict]) -> None:
        with self.changed:
            self.scripts[path] = list(answers)

    def at(self, path: str) -> list[Received]:
        with self.changed:
            return [r for r in self.requests if r.path == path]

    def wait(self, predicate, timeout: float = 20) -> None:
        """Block until `predicate(requests)` holds (woken by each request), or fail."""
        with self.changed:
            if not self.changed.wait_for(lambda: predicate(self.requests), timeout):
                raise AssertionError(f"receiver: condition not met within {timeout} s "
                                     f"({len(self.requests)} requests)")


def wait_until(predicate, timeout: float = 20, what: str = "condition"):
    """Poll a database condition (no event to wait on); returns the predicate's truthy value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout} s")


@pytest.fixture(scope="session")
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def canary():
    """An internal service on every local address, on a port no allow-list entry names."""
    r = Receiver(host="0.0.0.0").start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def spare_port() -> int:
    """An allow-listed port with nothing listening until a test starts a receiver there."""
    return free_port()


@pytest.fixture(scope="session")
def webhook_settings(base_settings, receiver, spare_port):
    redis_base = base_settings.redis_url.rsplit("/", 1)[0]
    return base_settings.model_copy(update={
        "redis_url": f"{redis_base}/2",
        "webhook_allow": (f"127.0.0.1:{receiver.port}", f"127.0.0.1:{spare_port}"),
        "webhook_retry_schedule": SCHEDULE,
        "webhook_retry_jitter": JITTER,
        "webhook_sweep_interval": 0.2,
        "webhook_secret_overlap": 3600,
    })


def _env(settings) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "SWITCHYARD_WEBHOOK_ALLOW": ",".join(settings.webhook_allow),
        "SWITCHYARD_WEBHOOK_RETRY_SCHEDULE": ",".join(map(str, settings.webhook_retry_schedule)),
        "SWITCHYARD_WEBHOOK_RETRY_JITTER": str(settings.webhook_retry_jitter),
        "SWITCHYARD_WEBHOOK_SWEEP_INTERVAL": str(settings.webhook_sweep_interval),
        "SWITCHYARD_WEBHOOK_CONCURRENCY": "16",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="session")
def webhook_workers(webhook_settings, tmp_path_factory):
    """Two webhooks workers (two dispatchers competing for the same rows), ready to consume."""
    logs = tmp_path_factory.mktemp("webhook-workers")
    procs = []
    for i in range(WORKERS):
        env = {**_env(webhook_settings), "SWITCHYARD_NODE_ID": f"test-{i}"}
        log = open(logs / f"worker-{i}.log", "wb")
        procs.append((subprocess.Popen([sys.executable, "-m", "workers.webhook_worker"], cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), logs / f"worker-{i}.log"))
    app = create_celery(webhook_settings)
    expected = {f"webhooks@test-{i}" for i in range(WORKERS)}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for proc, path in procs:
            assert proc.poll() is None, f"webhooks worker exited:\n{path.read_text()[-3000:]}"
        answered = {name for reply in app.control.ping(timeout=0.5) for name in reply}
        if expected <= answered:
            break
    else:
        raise AssertionError("webhooks workers not ready:\n" + "\n".join(p.read_text()[-2000:] for _, p in procs))
    yield procs
    for proc, _ in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc, _ in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def app(webhook_settings):
    # Its own Redis database: nothing consumes the route queues the API publishes to here.
    redis_base = webhook_settings.redis_url.rsplit("/", 1)[0]
    return create_app(webhook_settings.model_copy(update={"redis_url": f"{redis_base}/3"}))


@pytest.fixture
def client(app):
    return app.test_client()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# The only two places these tests call the job store's insert and finish: after a change to those
# signatures, adapt these helpers and nothing else.
def new_job(db, tenant_id, url: str | None,
            events=("job.succeeded", "job.failed", "job.cancelled", "job.dead")) -> dict:
    return store.insert_job(db, tenant_id=tenant_id, model="m", strategy="round_robin",
                            request={"prompt": "hi", "max_tokens": 4}, metadata={"k": "v"}, max_attempts=3,
                            webhook={"url": url, "events": list(events)} if url else None)[0]


def finish(db, job: dict, status: JobStatus, node: str = "n1") -> bool:
    result = {"text": "done"} if status is JobStatus.SUCCEEDED else None
    error = {"type": "engine", "message": "boom"} if status is JobStatus.FAILED else None
    return store.finish_job(db, job["id"], job["attempt"], status, node_id=node, result=result, error=error)


def run_to_end(db, job: dict, status: JobStatus = JobStatus.SUCCEEDED, node: str = "n1") -> None:
    """Drive a job through the store's own transitions, as router and GPU worker do."""
    assert store.mark_routed(db, job["id"], job["attempt"], node)
    assert store.start_jobs(db, [(job["id"], job["attempt"])], node)
    assert finish(db, job, status, node)


def deliveries(db, job_id) -> list[dict]:
    with db.connection() as conn:
        return conn.execute("SELECT * FROM webhook_deliveries WHERE job_id = %s ORDER BY created_at",
                            (job_id,)).fetchall()


def attempts(db, delivery_id) -> list[dict]:
    with db.connection() as conn:
        return conn.execute("SELECT * FROM webhook_attempts WHERE delivery_id = %s ORDER BY attempt",
                            (delivery_id,)).fetchall()


def _local_address() -> str | None:
    """This machine's own non-loopback address (where an internal service would also listen)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def internal_urls(port: int) -> list[str]:
    """The SSRF matrix: every URL must be refused. Those that name `port` reach the canary if followed."""
    urls = [
        f"http://2130706433:{port}/", f"http://0x7f000001:{port}/", f"http://017700000001:{port}/",
        f"http://127.1:{port}/", f"http://0177.0.0.1:{port}/", f"http://127.0.0.1:{port}/",
        f"http://127.0.0.1.:{port}/", f"http://localhost:{port}/", f"http://LOCALHOST:{port}/",
        f"http://[::1]:{port}/", f"http://[::ffff:127.0.0.1]:{port}/", f"http://[::ffff:7f00:1]:{port}/",
        f"http://0.0.0.0:{port}/", f"http://0:{port}/", f"http://[::]:{port}/", f"http://[2002:7f00:1::]:{port}/",
        f"https://127.0.0.1:{port}/", f"ftp://127.0.0.1:{port}/", f"gopher://127.0.0.1:{port}/_x",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "http://[fd00:ec2::254]/",
        "http://10.0.0.1/", "http://172.16.0.1/", "http://192.168.0.1/", "http://100.64.0.1/",
        "http://224.0.0.1/", "http://[ff02::1]/", "http://240.0.0.1/", "http://255.255.255.255/",
        "http://[fc00::1]/", "http://198.18.0.1/",
    ]
    own = _local_address()
    if own:
        urls.append(f"http://{own}:{port}/")
    return urls


def canary_silent(canary: Receiver) -> None:
    assert canary.requests == [], [(r.path, r.headers.get("host")) for r in canary.requests]
