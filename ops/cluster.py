"""The local cluster: `python -m ops.cluster up | down | status` (the Makefile's `make up` / `make down`).

`up` starts Postgres and Redis (embedded ones, unless DATABASE_URL / REDIS_URL are set), migrates,
prepares the model, starts the API (gunicorn), the router, one GPU worker, the webhooks worker, the
ingest worker, a small local webhook receiver and Flower, then submits a few sample jobs, prints the
model's answers and shows the first job's webhook arriving at the receiver, its signature verified.
Last, a retrieval-augmented sample: the project's own docs (docs/*.md) are ingested into a collection
`switchyard-docs`, and one question is answered from them, printed with its citations.
State, logs and pid files live in `.switchyard/`, so a second `up` reuses everything the first prepared
and `down` stops exactly what `up` started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ops.processes import ROOT, ProcessError, ProcessGroup
from tasks.settings import Settings

DEFAULT_NODE_ID = "local-gpu-0"


def home(settings: Settings) -> Path:
    """The local cluster's state folder: SWITCHYARD_HOME, else .switchyard/ in the checkout."""
    return settings.home or ROOT / ".switchyard"


def local_urls(settings: Settings) -> dict[str, str]:
    """DATABASE_URL and REDIS_URL of the local cluster `make up` started (empty if it never ran)."""
    env = home(settings) / "env"
    if not env.exists():
        return {}
    pairs = (line.removeprefix("export ").split("=", 1) for line in env.read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs}


_SETTINGS = Settings.from_env()  # this module is an entry point: `python -m ops.cluster`
HOME = home(_SETTINGS)
RUN, LOGS = HOME / "run", HOME / "logs"
PG_PORT, VALKEY_PORT = _SETTINGS.pg_port, _SETTINGS.valkey_port
API_PORT, FLOWER_PORT, RECEIVER_PORT = _SETTINGS.api_port, _SETTINGS.flower_port, _SETTINGS.receiver_port
NODE_ID = _SETTINGS.node_id if "node_id" in _SETTINGS.model_fields_set else DEFAULT_NODE_ID
RECEIVER_URL = f"http://127.0.0.1:{RECEIVER_PORT}/hooks"
WEBHOOK_SECRET, WEBHOOKS_SEEN = HOME / "webhook-secret", HOME / "webhooks.jsonl"

SAMPLES = [
    {"messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], "max_tokens": 48, "temperature": 0},
    {"messages": [{"role": "user", "content": "Name three primary colors."}], "max_tokens": 48, "temperature": 0},
    {"prompt": "The three laws of thermodynamics are", "max_tokens": 48, "temperature": 0},
]

# The RAG sample: the project's own docs, and a question they answer.
RAG_COLLECTION = "switchyard-docs"
RAG_QUESTION = "What does make down do?"
RAG_TOP_K = 2  # the 135M model keeps to its context better with fewer passages


def rag_documents() -> list[Path]:
    """The docs/ folder's Markdown (the operator's guide and the benchmark reports). Not README.md: it
    quotes this very sample's question and answer, which retrieval would then find instead."""
    return sorted((ROOT / "docs").rglob("*.md"))


def secrets_key() -> str:
    """The local cluster's key sealing webhook secrets at rest: made once, kept in .switchyard/ (0600)."""
    path = HOME / "secrets.key"
    if not path.exists():
        from tasks.webhooks.sealing import new_key

        path.write_text(new_key())
        path.chmod(0o600)
    return path.read_text().strip()


def say(message: str) -> None:
    print(f"[switchyard] {message}", flush=True)


# --- backing services -----------------------------------------------------------------------------


def backing_services() -> dict[str, str]:
    from ops.services import EmbeddedPostgres, EmbeddedValkey

    urls = {"DATABASE_URL": _SETTINGS.database_url, "REDIS_URL": _SETTINGS.redis_url}
    if not urls["DATABASE_URL"]:
        say(f"embedded PostgreSQL 18 + pgvector on 127.0.0.1:{PG_PORT} (data in {HOME / 'pg'})")
        urls["DATABASE_URL"] = EmbeddedPostgres(HOME / "pg", PG_PORT).start().url
    if not urls["REDIS_URL"]:
        say(f"embedded Valkey (Redis protocol) on 127.0.0.1:{VALKEY_PORT}")
        urls["REDIS_URL"] = EmbeddedValkey(HOME / "valkey", VALKEY_PORT).start().url
    return urls


def demo_key(database_url: str) -> str:
    """The demo tenant's API key, created once and kept (mode 0600) in .switchyard/demo-api-key."""
    path = HOME / "demo-api-key"
    if path.exists():
        return path.read_text().strip()
    from tasks.db import make_pool
    from tasks.jobs import tenants

    with make_pool(database_url, max_size=1) as pool:
        _, key = tenants.create_tenant(pool, f"demo-{int(time.time())}")
    path.write_text(key)
    path.chmod(0o600)
    return key


# --- processes ------------------------------------------------------------------------------------

APP = ("api", "router", "worker", "webhooks", "ingest", "receiver", "flower")


def group(env: dict[str, str] | None = None) -> ProcessGroup:
    """The cluster's processes: logs in .switchyard/logs, pid files in .switchyard/run, so that `down`
    (another process) stops what `up` started."""
    return ProcessGroup(LOGS, env, run_dir=RUN, grace=20)


#: Flower's Tasks page: state, worker, runtime and retries first, then args (job id, attempt) and result
FLOWER_COLUMNS = "name,uuid,state,worker,runtime,retries,received,args,result"


def flower_login(env: dict[str, str]) -> str:
    if env.get("FLOWER_BASIC_AUTH"):
        return "login required (FLOWER_BASIC_AUTH)"
    return ("no login: loopback only, for this quickstart; export FLOWER_BASIC_AUTH=user:password for one "
            "(docker-compose.yml requires it)")


def processes(env: dict[str, str]) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "api": [py, "-m", "gunicorn", "-c", "ops/gunicorn.conf.py", "-b", f"127.0.0.1:{API_PORT}", "api.wsgi:app"],
        "router": [py, "-m", "workers.router"],
        "worker": [py, "-m", "workers.gpu"],
        "webhooks": [py, "-m", "workers.webhook_worker"],
        "ingest": [py, "-m", "workers.ingest_worker"],
        "receiver": [py, "-m", "ops.receiver", "--port", str(RECEIVER_PORT), "--secret-file", str(WEBHOOK_SECRET),
                     "--out", str(WEBHOOKS_SEEN)],
        # Loopback only; FLOWER_BASIC_AUTH (user:password) in the environment turns its login on.
        "flower": [py, "-m", "celery", "-A", "tasks.app", "flower", f"--port={FLOWER_PORT}",
                   "--address=127.0.0.1", f"--tasks_columns={FLOWER_COLUMNS}"],
    }


def wait_ready(procs: ProcessGroup, timeout: float = 300) -> None:
    """Poll /readyz, printing progress, until the API, both stores and a worker are up; fail at once,
    with its log tail, if one of the processes exits."""
    started = time.monotonic()
    last, last_said = "", 0.0

    def ready() -> bool:
        nonlocal last, last_said
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{API_PORT}/readyz", timeout=5) as resp:
                return resp.status == 200
        except urllib.error.HTTPError as exc:
            checks = json.loads(exc.read()).get("checks", {})
            state = ", ".join(f"{k}: {v}" for k, v in checks.items())
            elapsed = time.monotonic() - started
            if state != last or elapsed - last_said >= 10:  # a line per change, and at least every 10 s
                say(f"waiting ({elapsed:.0f} s): {state} - the worker loads the model (30-60 s)")
                last, last_said = state, elapsed
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        return False

    try:
        procs.wait_until(ready, timeout, "the cluster's /readyz", watch=("api", "router", "worker", "webhooks",
                                                                        "ingest", "receiver"), show=("worker", "api"),
                         interval=1)
    except ProcessError as exc:
        raise SystemExit(f"{exc}\n(logs in {LOGS}; stop what did start with: make down)") from None
    say(f"ready after {time.monotonic() - started:.0f} s")


def _call(method: str, path: str, key: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{API_PORT}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=90) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


def run_samples(key: str) -> None:
    say(f"submitting {len(SAMPLES)} sample jobs (the first with a webhook to {RECEIVER_URL})")
    hook = {"url": RECEIVER_URL, "events": ["job.succeeded", "job.failed", "job.cancelled", "job.dead"]}
    jobs = [(_call("POST", "/v1/jobs", key, {**s, "webhook": hook} if i == 0 else s), s) for i, s in enumerate(SAMPLES)]
    for job, sample in jobs:
        done = _call("GET", f"/v1/jobs/{job['id']}?wait=60", key)
        question = sample.get("prompt") or sample["messages"][-1]["content"]
        print(f"\n  Q: {question}")
        if done["status"] == "succeeded":
            usage = done["result"]["usage"]
            answer = done["result"]["text"].strip().replace("\n", "\n     ")
            print(f"  A: {answer}")
            print(f"     ({done['status']}, {usage['prompt_tokens']} prompt + {usage['completion_tokens']} output tokens, "
                  f"node {done['node_id']})")
        else:
            print(f"  !! job {done['id']} is {done['status']}: {done.get('error')}")
    print()
    show_webhook(key, jobs[0][0]["id"])


def run_rag_sample(key: str, timeout: float = 180) -> None:
    """Ingest the project's docs into a fresh `switchyard-docs` collection (made anew on every `up`, so
    it holds the docs as they are now), then ask RAG_QUESTION over it and print the cited answer."""
    for collection in _call("GET", "/v1/collections", key)["data"]:
        if collection["name"] == RAG_COLLECTION:
            _call("DELETE", f"/v1/collections/{collection['id']}", key)
    collection = _call("POST", "/v1/collections", key, {"name": RAG_COLLECTION})
    base = f"/v1/collections/{collection['id']}/documents"
    paths = rag_documents()
    say(f"RAG sample: ingesting {len(paths)} documents of the project's docs into collection {RAG_COLLECTION!r}")
    for path in paths:
        _call("POST", base, key, {"title": str(path.relative_to(ROOT)), "text": path.read_text(),
                                  "content_type": "text/markdown"})
    deadline, shown = time.monotonic() + timeout, None
    while True:
        docs = _call("GET", base, key)["data"]
        progress = (sum(d["chunks_embedded"] for d in docs), sum(d["chunks_total"] or 0 for d in docs),
                    sum(d["status"] == "ready" for d in docs))
        if progress != shown:
            say(f"  {progress[2]}/{len(docs)} documents ready, {progress[0]}/{progress[1]} chunks embedded")
            shown = progress
        if any(d["status"] == "failed" for d in docs):
            raise SystemExit(f"RAG sample: ingestion failed: {[d['error'] for d in docs if d['error']]}")
        if all(d["status"] == "ready" for d in docs):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"RAG sample: documents not ready after {timeout:.0f} s; see {LOGS / 'ingest.log'}")
        time.sleep(0.5)
    job = _call("POST", "/v1/jobs", key, {"messages": [{"role": "user", "content": RAG_QUESTION}],
                                          "max_tokens": 40, "temperature": 0,
                                          "rag": {"collections": [collection["id"]], "top_k": RAG_TOP_K}})
    done = _call("GET", f"/v1/jobs/{job['id']}?wait=60", key)
    print(f"\n  Q: {RAG_QUESTION}   (rag: top {RAG_TOP_K} of {RAG_COLLECTION})")
    if done["status"] != "succeeded":
        print(f"  !! job {done['id']} is {done['status']}: {done.get('error')}\n")
        return
    result = done["result"]
    print("  A: " + result["text"].strip().replace("\n", "\n     "))
    for citation in result["citations"]:
        snippet = " ".join(citation["snippet"].split())[:110]
        print(f"     [{citation['n']}] {citation['title']} (chars {citation['char_start']}-{citation['char_end']}, "
              f"score {citation['score']:.3f}): {snippet}…")
    if not result["citations"]:
        print(f"     (no citations: {result['retrieval'].get('note')})")
    print()


def show_webhook(key: str, job_id: str, timeout: float = 30) -> None:
    """Wait for the first job's webhook at the local receiver, and show it with its delivery log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = WEBHOOKS_SEEN.read_text().splitlines() if WEBHOOKS_SEEN.exists() else []
        arrived = [json.loads(line) for line in lines if json.loads(line)["job_id"] == job_id]
        if arrived:
            event = arrived[-1]
            [delivery] = [d for d in _call("GET", f"/v1/jobs/{job_id}/deliveries", key)["data"]
                          if d["id"] == event["webhook_id"]]
            attempt = delivery["attempts"][-1]
            print(f"  webhook {event['type']} for job {job_id} arrived at {RECEIVER_URL}")
            print(f"     (webhook-id {event['webhook_id']}, signature verified with standardwebhooks; "
                  f"delivery {delivery['status']} on attempt {delivery['attempt_count']}: "
                  f"HTTP {attempt['status_code']} in {attempt['latency_ms']:.0f} ms)\n")
            return
        time.sleep(0.5)
    print(f"  !! no webhook for job {job_id} after {timeout:.0f} s; see {LOGS / 'webhooks.log'} and "
          f"GET /v1/jobs/{job_id}/deliveries\n")


def metrics_ports() -> dict[str, int]:
    """The port each Celery process of the cluster serves its metrics on (tasks/metrics/exposition.py)."""
    from tasks.metrics.exposition import ROLE_PORTS, role_port

    return {role: role_port(_SETTINGS, role) for role in ROLE_PORTS if role_port(_SETTINGS, role)}


# --- commands -------------------------------------------------------------------------------------


def up(args) -> None:
    for d in (HOME, RUN, LOGS):
        d.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    urls = backing_services()
    from tasks.db import migrate
    from workers.model import prepare

    migrate(urls["DATABASE_URL"], log=say)
    key = demo_key(urls["DATABASE_URL"])
    prepare(_SETTINGS.cache_dir, log=say)
    env = {**os.environ, **urls, "HF_HUB_OFFLINE": "1", "SWITCHYARD_NODE_ID": NODE_ID, "PYTHONUNBUFFERED": "1"}
    # The local receiver is on loopback, which the SSRF guard refuses unless it is allow-listed.
    env["SWITCHYARD_WEBHOOK_ALLOW"] = ",".join([*_SETTINGS.webhook_allow, f"127.0.0.1:{RECEIVER_PORT}"])
    env["SWITCHYARD_SECRETS_KEY"] = _SETTINGS.secrets_key or secrets_key()
    env.setdefault("SWITCHYARD_LOG_FORMAT", "text")  # the quickstart's logs are read by people
    (HOME / "env").write_text("".join(f"export {k}={v}\n" for k, v in urls.items()))
    procs = group(env)
    for name, argv in processes(env).items():
        if procs.running(name):
            say(f"{name}: already running (pid {procs.pid(name)})")
            continue
        pid = procs.start(name, argv).pid
        say(f"{name}: started (pid {pid}, log {procs.log_path(name)})")
    wait_ready(procs)
    # The receiver verifies signatures with the demo tenant's secret (read on each request).
    WEBHOOK_SECRET.write_text(_call("GET", "/v1/webhooks/secret", key)["secret"])
    WEBHOOK_SECRET.chmod(0o600)
    if not args.no_samples:
        run_samples(key)
        run_rag_sample(key)
    say(f"up in {time.monotonic() - started:.0f} s")
    say(f"API     http://127.0.0.1:{API_PORT}   (try: curl http://127.0.0.1:{API_PORT}/readyz)")
    say(f"Flower  http://127.0.0.1:{FLOWER_PORT}   ({flower_login(env)})")
    say(f"Metrics http://127.0.0.1:{API_PORT}/metrics (API and cluster state); "
        + ", ".join(f"{role} :{port}" for role, port in metrics_ports().items()))
    say(f"Webhook receiver {RECEIVER_URL}   (events in {WEBHOOKS_SEEN}; log {LOGS / 'receiver.log'})")
    say(f"API key {key}   (also in {HOME / 'demo-api-key'}; URLs in {HOME / 'env'})")
    say("stop everything with: make down")


def down(_args) -> None:
    from ops.services import EmbeddedPostgres, EmbeddedValkey

    # Everything with a pid file: SIGTERM to each process group (a worker's vLLM engine processes with
    # it), SIGKILL to what is left after 20 s.
    for name in group().stop():
        say(f"{name}: stopped")
    if (HOME / "pg").exists():
        EmbeddedPostgres(HOME / "pg", PG_PORT).stop()
        say("postgres: stopped")
    if (HOME / "valkey").exists():
        EmbeddedValkey(HOME / "valkey", VALKEY_PORT).stop()
        say("valkey: stopped")


def status(_args) -> None:
    procs = group()
    for name in APP:
        pid = procs.pid(name)
        say(f"{name}: {'running (pid %d)' % pid if pid else 'stopped'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start everything and run the sample jobs")
    p_up.add_argument("--no-samples", action="store_true")
    sub.add_parser("down", help="stop everything `up` started")
    sub.add_parser("status")
    args = parser.parse_args(argv)
    {"up": up, "down": down, "status": status}[args.command](args)


if __name__ == "__main__":
    main()
