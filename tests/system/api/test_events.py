"""Following jobs live, on real processes (API under gunicorn, a router, SimulatedEngine GPU workers that
stream one numbered word per token, `w0 w1 ...`, so a lost or repeated piece shows): the job events
stream, its resumption after a dropped connection, a job retried on another node after its worker is
killed, and the official `openai` client streaming chat and text completions."""

from __future__ import annotations

import json
import signal

import openai
import pytest
import requests

from tasks.jobs import tenants

TOKENS = 60


@pytest.fixture
def cluster(make_cluster):
    cluster = make_cluster()
    cluster.start_api()
    cluster.start_router()
    for node in ("sim-0", "sim-1"):
        cluster.start_worker(node, simulated=True, token_seconds=0.05)  # 60 tokens: 3 s
    cluster.wait_api()
    cluster.wait_nodes(["sim-0", "sim-1"])
    _, cluster.key = tenants.create_tenant(cluster.db, "streams")
    cluster.headers = {"Authorization": f"Bearer {cluster.key}"}
    return cluster


def submit(cluster, **body) -> str:
    r = requests.post(f"{cluster.api}/v1/jobs", headers=cluster.headers, timeout=30,
                      json={"prompt": "count", "max_tokens": TOKENS, "temperature": 0, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def events(cluster, job_id, *, last_event_id=None, stop_after=None):
    """(id, event, data) from GET /v1/jobs/{id}/events until the stream ends, or the first `stop_after`
    deltas (then the connection is dropped)."""
    headers = {**cluster.headers, **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    out, deltas = [], 0
    with requests.get(f"{cluster.api}/v1/jobs/{job_id}/events", headers=headers, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream"), r.text
        fields = {}
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if "data" in fields:
                out.append((fields.get("id"), fields.get("event"), json.loads(fields["data"])))
                deltas += fields.get("event") == "delta"
            fields = {}
            if stop_after and deltas >= stop_after:
                break
    return out


def text_of(evs, attempt=None) -> str:
    return "".join(d["text"] for _, e, d in evs if e == "delta" and (attempt is None or d["attempt"] == attempt))


EXPECTED = "".join(f"w{i} " for i in range(TOKENS))


def test_streams_on_one_cluster(cluster):
    """The cases that leave the cluster as it was share it (a cluster takes most of a minute to start)."""
    a_streamed_job_sends_status_and_every_token_then_its_result(cluster)
    a_dropped_stream_resumes_without_losing_or_repeating_a_token(cluster)
    a_job_not_streamed_sends_its_status_and_result(cluster)
    bad_or_foreign_event_streams_are_refused(cluster)
    the_openai_client_streams_chat_and_text_completions(cluster)


def a_streamed_job_sends_status_and_every_token_then_its_result(cluster):
    job_id = submit(cluster, stream=True)
    evs = events(cluster, job_id)
    statuses = [d["status"] for _, e, d in evs if e == "status"]
    assert statuses[0] in ("queued", "routed", "running") and statuses[-2:] == ["running", "succeeded"], statuses
    assert text_of(evs) == EXPECTED
    final = evs[-1][2]
    assert final["result"]["text"] == EXPECTED and final["attempt"] == 1
    assert all(i for i, e, _ in evs[1:])  # every event after the first (the job as it was) has an id


def a_dropped_stream_resumes_without_losing_or_repeating_a_token(cluster):
    job_id = submit(cluster, stream=True)
    first = events(cluster, job_id, stop_after=10)
    resumed = events(cluster, job_id, last_event_id=[i for i, _, _ in first if i][-1])
    assert text_of(first) + text_of(resumed) == EXPECTED
    assert resumed[-1][2]["status"] == "succeeded"
    print(f"dropped after {len(text_of(first).split())} tokens, resumed for the other "
          f"{len(text_of(resumed).split())}")


def test_a_job_retried_after_its_worker_is_killed_streams_its_new_attempt(cluster):
    job_id = submit(cluster, stream=True)
    first = events(cluster, job_id, stop_after=10)
    job = requests.get(f"{cluster.api}/v1/jobs/{job_id}", headers=cluster.headers, timeout=10).json()
    cluster.signal(job["node_id"], signal.SIGKILL)
    rest = events(cluster, job_id, last_event_id=[i for i, _, _ in first if i][-1])
    marks = [(d["status"], d["attempt"]) for _, e, d in rest if e == "status"]
    assert ("queued", 2) in marks and ("running", 2) in marks and marks[-1] == ("succeeded", 2), marks
    assert text_of(rest, attempt=2) == EXPECTED  # the new attempt streams from its beginning
    print(f"attempt 1 streamed {len(text_of(first).split())} tokens before its node was killed; then {marks}")


def a_job_not_streamed_sends_its_status_and_result(cluster):
    job_id = submit(cluster, max_tokens=5)
    evs = events(cluster, job_id)
    assert [e for _, e, _ in evs if e == "delta"] == []
    assert evs[-1][2]["status"] == "succeeded" and evs[-1][2]["result"]["text"]


def bad_or_foreign_event_streams_are_refused(cluster):
    job_id = submit(cluster, max_tokens=5)
    r = requests.get(f"{cluster.api}/v1/jobs/{job_id}/events", timeout=10,
                     headers={**cluster.headers, "Last-Event-ID": "yesterday"})
    assert r.status_code == 400 and "Last-Event-ID" in r.json()["detail"]
    _, other = tenants.create_tenant(cluster.db, "someone-else")
    r = requests.get(f"{cluster.api}/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {other}"}, timeout=10)
    assert r.status_code == 404


def the_openai_client_streams_chat_and_text_completions(cluster):
    oa = openai.OpenAI(base_url=f"{cluster.api}/v1", api_key=cluster.key, max_retries=0, timeout=60)
    model = cluster.settings.model_name
    chunks = list(oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "count"}],
                                             max_tokens=TOKENS, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == EXPECTED
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == TOKENS and len(chunks) > TOKENS // 4
    job_id = chunks[0].id.removeprefix("chatcmpl-")
    job = requests.get(f"{cluster.api}/v1/jobs/{job_id}", headers=cluster.headers, timeout=10).json()
    assert job["result"]["text"] == EXPECTED

    pieces = list(oa.completions.create(model=model, prompt="count", max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == "".join(f"w{i} " for i in range(8))
    print(f"chat: {len(chunks)} chunks; completion: {len(pieces)} chunks")
