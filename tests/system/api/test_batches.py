"""The Batch API on real processes (the API under gunicorn, a router with its reconciler and dispatcher,
a SimulatedEngine GPU worker, a webhooks worker), driven by the official `openai` client unmodified:
files.create, batches.create / retrieve / list / cancel, files.content; a 1000-line batch with one result
per line; bad lines reported by line number; another tenant's files and batches are 404; a short window
expires with what finished; a cancel keeps what finished; signed batch webhooks; and the latency of
interactive jobs while a large batch runs."""

from __future__ import annotations

import io
import json
import statistics
import sys
import time
import uuid

import openai
import pytest
import requests
from standardwebhooks import Webhook

from ops.services import EmbeddedValkey, free_port
from tasks.batches.resource import BATCH_PREFIX, parse_id
from tasks.jobs import tenants
from tests.receiver import Receiver
from tests.support import auth

SHORT_WINDOW = 2.0  # seconds: the completion window of batches created through the second API
# The GPU worker: 32 engine seats (batch jobs may hold 24 of them: all but SWITCHYARD_BATCH_SIZE), 2 ms a
# simulated token. The large batch's lines are 500 tokens (1 s), so the engine, not this 2-core machine's
# CPU, is what the batch fills: the situation the priority classes are for (a GPU fleet).
WORKER_ENV = {"SWITCHYARD_MAX_NUM_SEQS": "32", "SWITCHYARD_BATCH_SIZE": "8"}
BIG_BATCH, BIG_TOKENS = 1000, 500


@pytest.fixture(scope="module")
def hooks():
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def cluster(backing, model_path, tmp_path_factory, hooks):
    """One cluster for the module: an API, a second API whose batches have a SHORT_WINDOW, a router, a
    simulated GPU worker and a webhooks worker that may send to `hooks`."""
    from ops.testbed import Cluster, fresh_database

    pg, _ = backing
    root = tmp_path_factory.mktemp("batches")
    valkey = EmbeddedValkey(root / "valkey", free_port()).start()
    cluster = Cluster(root / "logs", database_url=fresh_database(pg.url), redis_url=valkey.url, model_path=model_path,
                      webhook_allow=f"127.0.0.1:{hooks.port}", webhook_sweep_interval=0.2)
    try:
        cluster.start_router()
        cluster.start_worker("sim-0", simulated=True, **WORKER_ENV)
        cluster.start("webhooks", [sys.executable, "-m", "workers.webhook_worker"], SWITCHYARD_NODE_ID="webhooks-0")
        short = f"127.0.0.1:{free_port()}"
        cluster.start("api-short", [sys.executable, "-m", "gunicorn", "-c", "ops/gunicorn.conf.py", "-b", short,
                                    "api.wsgi:app"], SWITCHYARD_BATCH_WINDOW_SECONDS=str(SHORT_WINDOW),
                      SWITCHYARD_API_WORKERS="1")
        cluster.start_api()
        cluster.wait_api()
        cluster.short_api = f"http://{short}"
        cluster.wait_until(lambda: _answers(cluster.short_api), 60, "the short-window API answering",
                           watch=["api-short"])
        cluster.wait_nodes(["sim-0"])
        yield cluster
    finally:
        cluster.close()
        valkey.stop()


def _answers(api: str) -> bool:
    try:
        return requests.get(f"{api}/healthz", timeout=2).ok
    except requests.RequestException:
        return False


def _client(cluster, name: str, api: str | None = None) -> tuple[openai.OpenAI, str]:
    _, key = tenants.create_tenant(cluster.db, name)
    return openai.OpenAI(base_url=f"{api or cluster.api}/v1", api_key=key, max_retries=0, timeout=120), key


def _jsonl(lines: list[dict]) -> io.BytesIO:
    data = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())
    data.name = "requests.jsonl"
    return data


def _chat(custom_id: str, model: str, content: str = "Say something.", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                     "temperature": 0, **body}}


def _text(custom_id: str, model: str, max_tokens: int) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": "x", "max_tokens": max_tokens, "temperature": 0}}


def _wait_ended(oa: openai.OpenAI, batch_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = oa.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout} s: {batch.request_counts}")


def _lines(oa: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [] if file_id is None else [json.loads(line) for line in oa.files.content(file_id).text.splitlines()]


def test_the_openai_client_runs_a_batch_end_to_end(cluster):
    oa, _ = _client(cluster, "batch-client")
    model = cluster.settings.model_name
    say = print
    say("\n--- openai client session (batch) ---")
    f = oa.files.create(file=_jsonl([_chat(f"q-{i}", model, f"Question {i}?") for i in range(3)]), purpose="batch")
    say(f">>> client.files.create(file=requests.jsonl, purpose='batch')\n{f.model_dump_json()}")
    assert f.id.startswith("file-") and f.object == "file" and f.purpose == "batch" and f.bytes > 0
    assert oa.files.retrieve(f.id).filename == "requests.jsonl"

    batch = oa.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"purpose": "demo"})
    say(f">>> client.batches.create(input_file_id={f.id!r}, endpoint='/v1/chat/completions', "
        f"completion_window='24h', metadata={{'purpose': 'demo'}})\n{batch.model_dump_json()}")
    assert batch.id.startswith("batch_") and batch.object == "batch" and batch.status == "in_progress"
    assert batch.input_file_id == f.id and batch.metadata == {"purpose": "demo"}
    assert batch.request_counts.total == 3 and batch.expires_at - batch.created_at == 86400

    done = _wait_ended(oa, batch.id)
    say(f">>> client.batches.retrieve({batch.id!r})\n{done.model_dump_json()}")
    assert done.status == "completed" and done.request_counts.completed == 3 and done.request_counts.failed == 0
    assert done.output_file_id and done.error_file_id is None and done.completed_at >= done.in_progress_at
    assert done.usage.output_tokens > 0
    content = oa.files.content(done.output_file_id).text
    say(f">>> client.files.content({done.output_file_id!r}).text\n{content.strip()}")
    results = [json.loads(line) for line in content.splitlines()]
    assert [r["custom_id"] for r in results] == ["q-0", "q-1", "q-2"]
    for r in results:
        assert r["id"].startswith("batch_req_") and r["error"] is None and r["response"]["status_code"] == 200
        assert r["response"]["body"]["object"] == "chat.completion"
        assert r["response"]["body"]["choices"][0]["message"]["content"]
    assert oa.files.retrieve(done.output_file_id).purpose == "batch_output"

    listed = oa.batches.list(limit=10)
    say(f">>> [b.id for b in client.batches.list(limit=10)]\n{[b.id for b in listed.data]}")
    assert [b.id for b in listed.data] == [batch.id]
    with pytest.raises(openai.ConflictError):
        oa.batches.cancel(batch.id)  # it has ended
    # Each line was a job of priority `batch`, its custom_id kept.
    with cluster.db.connection() as conn:
        rows = conn.execute("SELECT priority, custom_id, status FROM jobs WHERE custom_id LIKE 'q-%%' "
                            "ORDER BY batch_line").fetchall()
    assert [(r["priority"], r["custom_id"], r["status"]) for r in rows] == [("batch", f"q-{i}", "succeeded")
                                                                           for i in range(3)]


def test_a_1000_line_batch_completes_with_one_result_per_line(cluster):
    oa, _ = _client(cluster, "batch-1000")
    model = cluster.settings.model_name
    ids = [f"req-{i:04d}" for i in range(1000)]
    f = oa.files.create(file=_jsonl([_chat(c, model, f"Item {c}: summarize.") for c in ids]), purpose="batch")
    started = time.monotonic()
    batch = oa.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    accepted = time.monotonic() - started
    assert batch.status == "in_progress" and batch.request_counts.total == 1000
    seen = []
    deadline = time.monotonic() + 300
    while (current := oa.batches.retrieve(batch.id)).status == "in_progress" and time.monotonic() < deadline:
        seen.append(current.request_counts.completed)
        time.sleep(0.5)
    done = _wait_ended(oa, batch.id)
    took = time.monotonic() - started
    print(f"\n1000-line batch: accepted in {accepted:.2f} s, completed in {took:.1f} s; "
          f"completed counts seen while in progress: {seen[:8]}{'…' if len(seen) > 8 else ''}")
    assert done.status == "completed" and done.request_counts.completed == 1000 and done.request_counts.failed == 0
    assert seen == sorted(seen)  # request_counts kept current, never going back
    results = _lines(oa, done.output_file_id)
    assert len(results) == 1000 and sorted(r["custom_id"] for r in results) == ids
    assert all(r["response"]["status_code"] == 200 and r["response"]["body"]["choices"][0]["message"]["content"]
               for r in results)
    assert len({r["response"]["request_id"] for r in results}) == 1000 and done.error_file_id is None


def test_bad_lines_are_reported_by_line_number(cluster):
    oa, key = _client(cluster, "batch-bad")
    model = cluster.settings.model_name
    # A line that is not JSON (or a repeated custom_id) refuses the upload, naming the line.
    bad_json = io.BytesIO((json.dumps(_chat("a", model)) + "\n{\"custom_id\": \"b\",\n").encode())
    bad_json.name = "bad.jsonl"
    with pytest.raises(openai.BadRequestError) as refused:
        oa.files.create(file=bad_json, purpose="batch")
    assert "line 2: not valid JSON" in refused.value.message and refused.value.code == "invalid_batch_file"
    with pytest.raises(openai.BadRequestError) as repeated:
        oa.files.create(file=_jsonl([_chat("a", model), _chat("a", model)]), purpose="batch")
    assert "line 2: custom_id 'a' is already used on line 1" in repeated.value.message

    # Bodies the endpoint would refuse fail the batch: each bad line with what to fix; nothing runs.
    f = oa.files.create(file=_jsonl([
        _chat("ok", model),
        _chat("no-model", "gpt-9"),
        _chat("too-long", model, "word " * 3000),
        _chat("hot", model, temperature=7),
        {**_text("wrong-url", model, 4)},
        _chat("tools", model, tools=[{"type": "function"}]),
    ]), purpose="batch")
    batch = oa.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "failed" and batch.failed_at and batch.request_counts.total == 0
    errors = {e.line: e for e in batch.errors.data}
    print("\nfailed batch errors:\n" + "\n".join(f"  line {e.line}: {e.code} ({e.param}): {e.message}"
                                                for e in batch.errors.data))
    assert sorted(errors) == [2, 3, 4, 5, 6]
    assert errors[2].code == "model_not_found" and "gpt-9" in errors[2].message
    assert errors[3].param == "body.messages" and "context" in errors[3].message
    assert errors[4].param == "body.temperature"
    assert errors[5].code == "invalid_url" and errors[5].param == "url"
    assert errors[6].param == "body.tools" and errors[6].code == "unsupported_parameter"
    with cluster.db.connection() as conn:
        assert conn.execute("SELECT count(*) AS n FROM jobs WHERE custom_id = 'ok'").fetchone()["n"] == 0
    # Bad requests to the Batch API itself: the client's own error types.
    with pytest.raises(openai.BadRequestError):
        oa.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        oa.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="48h")
    with pytest.raises(openai.NotFoundError):
        oa.batches.create(input_file_id="file-0000", endpoint="/v1/completions", completion_window="24h")
    answer = requests.post(f"{cluster.api}/v1/files", headers=auth(key), data={"purpose": "fine-tune"},
                           files={"file": ("x.jsonl", b"{}\n")}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "purpose"


def test_another_tenants_files_and_batches_are_404(cluster):
    owner, _ = _client(cluster, "batch-owner")
    other, _ = _client(cluster, "batch-other")
    f = owner.files.create(file=_jsonl([_chat("x", cluster.settings.model_name)]), purpose="batch")
    batch = owner.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (lambda: other.files.retrieve(f.id), lambda: other.files.content(f.id),
                 lambda: other.batches.retrieve(batch.id), lambda: other.batches.cancel(batch.id),
                 lambda: other.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.batches.list().data == [] and other.files.list().data == []
    assert _wait_ended(owner, batch.id).status == "completed"


def test_a_batch_that_reaches_its_window_returns_what_finished(cluster, hooks):
    oa, _ = _client(cluster, "batch-expiry", api=cluster.short_api)
    model = cluster.settings.model_name
    fast, slow = [f"fast-{i}" for i in range(5)], [f"slow-{i}" for i in range(3)]
    # 1900 tokens at the simulated 2 ms a token: 3.8 s, past the 2 s window
    f = oa.files.create(file=_jsonl([_text(c, model, 4) for c in fast] + [_text(c, model, 1900) for c in slow]),
                        purpose="batch")
    batch = oa.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                              metadata={"webhook_url": hooks.url("/expired")})
    assert batch.expires_at - batch.created_at == SHORT_WINDOW
    done = _wait_ended(oa, batch.id, timeout=60)
    assert done.status == "expired" and done.expired_at >= done.expires_at
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (8, 5, 3)
    assert sorted(r["custom_id"] for r in _lines(oa, done.output_file_id)) == fast
    errors = _lines(oa, done.error_file_id)
    assert sorted(e["custom_id"] for e in errors) == slow
    assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors)
    hooks.wait(lambda rs: any(r.path == "/expired" for r in rs))
    assert hooks.at("/expired")[0].event["type"] == "batch.expired"


def test_a_cancelled_batch_keeps_what_finished(cluster, hooks):
    oa, _ = _client(cluster, "batch-cancel")
    model = cluster.settings.model_name
    fast, slow = [f"fast-{i}" for i in range(4)], [f"slow-{i}" for i in range(6)]
    f = oa.files.create(file=_jsonl([_text(c, model, 4) for c in fast] + [_text(c, model, 1900) for c in slow]),
                        purpose="batch")
    batch = oa.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                              metadata={"webhook_url": hooks.url("/cancelled")})
    deadline = time.monotonic() + 30
    while oa.batches.retrieve(batch.id).request_counts.completed < len(fast):
        assert time.monotonic() < deadline, "the fast lines did not finish"
        time.sleep(0.1)
    cancelling = oa.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    assert oa.batches.cancel(batch.id).status in ("cancelling", "cancelled")  # again: no error
    done = _wait_ended(oa, batch.id, timeout=30)
    assert done.status == "cancelled" and done.cancelled_at
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 6)
    assert sorted(r["custom_id"] for r in _lines(oa, done.output_file_id)) == fast
    assert {e["error"]["code"] for e in _lines(oa, done.error_file_id)} == {"batch_cancelled"}
    with cluster.db.connection() as conn:  # the slow lines, running when the cancel came, were cancelled
        rows = conn.execute("SELECT custom_id, status FROM jobs WHERE batch_id = %s ORDER BY batch_line",
                            (parse_id(batch.id, BATCH_PREFIX),)).fetchall()
    assert [(r["custom_id"], r["status"]) for r in rows] == [(c, "succeeded") for c in fast] + [(c, "cancelled")
                                                                                               for c in slow]
    hooks.wait(lambda rs: any(r.path == "/cancelled" for r in rs))
    assert hooks.at("/cancelled")[0].event["type"] == "batch.cancelled"


def test_batch_status_changes_arrive_as_signed_webhooks(cluster, hooks):
    oa, key = _client(cluster, "batch-hooks")
    model = cluster.settings.model_name
    f = oa.files.create(file=_jsonl([_chat(f"h-{i}", model) for i in range(5)]), purpose="batch")
    batch = oa.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"webhook_url": hooks.url("/batches"), "team": "search"})
    bad = oa.files.create(file=_jsonl([_chat("x", "gpt-9")]), purpose="batch")
    failed = oa.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h",
                               metadata={"webhook_url": hooks.url("/batches")})
    assert failed.status == "failed"
    assert _wait_ended(oa, batch.id).status == "completed"
    hooks.wait(lambda rs: len([r for r in rs if r.path == "/batches"]) == 2)
    secret = requests.get(f"{cluster.api}/v1/webhooks/secret", headers=auth(key), timeout=10).json()["secret"]
    got = {r.event["data"]["id"]: r for r in hooks.at("/batches")}
    completed = got[batch.id]
    # Standard Webhooks, and the openai client's own verification (webhook-id, -timestamp, -signature)
    assert Webhook(secret).verify(completed.body, completed.headers)["type"] == "batch.completed"
    event = oa.webhooks.unwrap(completed.body, completed.headers, secret=secret)
    print(f"\nbatch webhook, unwrapped by the openai client: {type(event).__name__} {event.id} data.id={event.data.id}")
    assert event.type == "batch.completed" and event.data.id == batch.id and event.id == f"evt_{uuid.UUID(completed.id).hex}"
    data = completed.event["data"]
    assert data["status"] == "completed" and data["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    assert data["output_file_id"] and data["metadata"]["team"] == "search"
    assert oa.webhooks.unwrap(got[failed.id].body, got[failed.id].headers, secret=secret).type == "batch.failed"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        oa.webhooks.unwrap(completed.body.replace(b"completed", b"cancelled"), completed.headers, secret=secret)
    # A webhook URL the SSRF guard refuses is refused at creation.
    with pytest.raises(openai.BadRequestError) as refused:
        oa.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                          metadata={"webhook_url": "http://169.254.169.254/latest/meta-data/"})
    assert refused.value.param == "metadata.webhook_url"


def _latencies(oa: openai.OpenAI, model: str, n: int, spacing: float = 0.1) -> tuple[list[float], list[str]]:
    """Seconds each of `n` interactive chat completions took, one after another, `spacing` s apart, and
    their job ids."""
    took, ids = [], []
    for i in range(n):
        started = time.monotonic()
        raw = oa.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"Quick {i}?"}], max_tokens=16, temperature=0)
        took.append(time.monotonic() - started)
        ids.append(raw.headers["X-Switchyard-Job-Id"])
        time.sleep(spacing)
    return took, ids


def _phases(cluster, ids: list[str]) -> str:
    """p50 / max of each phase of these jobs, in ms: waiting to be routed (the fair queue), routed until
    started (the node's queue and batching), generating (the engine)."""
    with cluster.db.connection() as conn:
        rows = conn.execute("SELECT created_at, routed_at, started_at, finished_at FROM jobs WHERE id = ANY(%s::uuid[])",
                            (ids,)).fetchall()
    phases = {"queued": ("created_at", "routed_at"), "routed": ("routed_at", "started_at"),
              "generating": ("started_at", "finished_at")}
    out = []
    for name, (a, b) in phases.items():
        took = [(r[b] - r[a]).total_seconds() * 1000 for r in rows]
        out.append(f"{name} {statistics.median(took):.0f}/{max(took):.0f}")
    return " ".join(out)


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def test_interactive_latency_while_a_large_batch_runs(cluster):
    """Interactive jobs of a tenant whose own large batch is running: the batch waits behind them in the
    fair queue (priority classes) and leaves engine seats free for them (settings.batch_slots)."""
    oa, _ = _client(cluster, "interactive-and-batch")
    model = cluster.settings.model_name
    _latencies(oa, model, 5)  # warm the path
    alone, alone_ids = _latencies(oa, model, 40)

    f = oa.files.create(file=_jsonl([_chat(f"big-{i}", model, f"Item {i}", max_tokens=BIG_TOKENS)
                                     for i in range(BIG_BATCH)]), purpose="batch")
    big = oa.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while oa.batches.retrieve(big.id).request_counts.completed < 50:  # the batch is filling the engine
        time.sleep(0.2)
    during, during_ids = [], []
    while len(during) < 40:
        took, ids = _latencies(oa, model, 5)
        during, during_ids = during + took, during_ids + ids
        progress = oa.batches.retrieve(big.id)
        assert progress.status == "in_progress", "the batch ended before the measurement did: make it larger"
    with cluster.db.connection() as conn:
        running = conn.execute("SELECT count(*) AS n FROM jobs WHERE batch_line IS NOT NULL AND status = 'running'"
                               ).fetchone()["n"]
    print(f"\ninteractive chat completions (16 tokens), 40 each; its tenant's {BIG_BATCH}-line batch of "
          f"{BIG_TOKENS}-token lines running: {progress.request_counts.completed}/{BIG_BATCH} done and {running} "
          "generating when the measurement ended; phases p50/max ms")
    for name, values, ids in (("alone", alone, alone_ids), ("with the batch", during, during_ids)):
        print(f"  {name:15s} p50 {_p(values, 50) * 1000:6.1f} ms   p95 {_p(values, 95) * 1000:6.1f} ms   "
              f"max {max(values) * 1000:6.1f} ms   ({_phases(cluster, ids)})")
    assert running >= 16  # the batch was filling the engine: most of its 24 seats generating
    assert _p(during, 95) <= 2 * _p(alone, 95)
    # Cancelling a large batch: its unfinished lines cancelled (the running ones aborted), what finished kept.
    oa.batches.cancel(big.id)
    done = _wait_ended(oa, big.id, timeout=120)
    counts = done.request_counts
    assert done.status == "cancelled" and counts.total == BIG_BATCH and counts.completed + counts.failed == BIG_BATCH
    assert len(_lines(oa, done.output_file_id)) == counts.completed
    assert len(_lines(oa, done.error_file_id)) == counts.failed
