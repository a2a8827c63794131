"""The whole job path on real services: HTTP → Postgres → Redis → router → GPU worker (real vLLM) →
Postgres → long-poll."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
import redis as redis_lib
import requests

from tasks.routing import registry

from tests.system.engine.support import NODE_ID

# Greedy decoding of a counting prompt keeps the model going until max_tokens: a reliably long job.
COUNTING = {"prompt": "Count from 1 to 2000, separated by commas: 1, 2, 3, 4, 5,", "temperature": 0}


def submit(stack, http, body: dict) -> dict:
    response = http.post(f"{stack.api}/v1/jobs", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def wait_for(stack, http, job_id: str, seconds: int = 60) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = http.get(f"{stack.api}/v1/jobs/{job_id}?wait={seconds}", timeout=seconds + 30).json()
        if job["status"] in ("succeeded", "failed", "cancelled", "dead"):
            return job
    raise AssertionError(f"job {job_id} did not finish")


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_twenty_jobs_over_http_all_succeed(stack, http):
    bodies = [({"messages": [{"role": "user", "content": f"Give me one word that rhymes with number {i}."}]}
               if i % 2 else {"prompt": f"Fact number {i} about the ocean:"}) | {"max_tokens": 24}
              for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        jobs = list(pool.map(lambda b: submit(stack, http, b), bodies))
        done = list(pool.map(lambda j: wait_for(stack, http, j["id"]), jobs))
    assert [j["status"] for j in done] == ["succeeded"] * 20, [j["error"] for j in done]
    for job in done:
        result = job["result"]
        assert result["text"].strip(), job
        assert result["usage"]["prompt_tokens"] > 0 and result["usage"]["completion_tokens"] > 0
        assert result["finish_reason"] in ("stop", "length")
        assert job["node_id"] == NODE_ID and job["attempt"] == 1
        assert ts(job["created_at"]) <= ts(job["routed_at"]) <= ts(job["started_at"]) <= ts(job["finished_at"])


def test_long_poll_returns_within_a_second_of_completion(stack, http):
    job = submit(stack, http, COUNTING | {"max_tokens": 64})
    response = http.get(f"{stack.api}/v1/jobs/{job['id']}?wait=60", timeout=90)
    returned = time.time()
    done = response.json()
    assert done["status"] == "succeeded"
    assert returned - ts(done["finished_at"]).timestamp() < 1.0


def test_cancel_a_running_job_stops_it(stack, http):
    job = submit(stack, http, COUNTING | {"max_tokens": 1500})
    deadline = time.monotonic() + 60
    while http.get(f"{stack.api}/v1/jobs/{job['id']}").json()["status"] != "running":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.05)
    cancelled = http.post(f"{stack.api}/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    # The engine aborts it at once (1500 tokens would take many seconds): the node's heartbeat soon
    # reports nothing in flight, and the row stays cancelled with no result.
    needle = f"job {job['id']} was cancelled: aborting"
    assert needle in _wait_for_log(stack, needle)
    deadline = time.monotonic() + 6
    while registry.live_nodes(redis_lib.Redis.from_url(stack.env["REDIS_URL"]))[0]["inflight"]:
        assert time.monotonic() < deadline, "the cancelled generation is still running"
        time.sleep(0.2)
    final = http.get(f"{stack.api}/v1/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["result"] is None


def _wait_for_log(stack, needle: str, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (text := stack.log("worker", 1_000_000)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return text


def test_short_job_overtakes_sixteen_long_ones(stack, http):
    """Batching is no barrier: a job arriving mid-generation joins the running engine."""
    longs = [submit(stack, http, COUNTING | {"max_tokens": 256}) for _ in range(16)]
    deadline = time.monotonic() + 60
    while not all(http.get(f"{stack.api}/v1/jobs/{j['id']}").json()["status"] == "running" for j in longs):
        assert time.monotonic() < deadline, "long jobs never all started"
        time.sleep(0.1)
    short = wait_for(stack, http, submit(stack, http, {"prompt": "Say hi.", "max_tokens": 8})["id"])
    longs = [wait_for(stack, http, j["id"]) for j in longs]
    assert short["status"] == "succeeded"
    assert all(j["status"] == "succeeded" for j in longs)
    assert all(j["result"]["usage"]["completion_tokens"] == 256 for j in longs)
    first_long = min(ts(j["finished_at"]) for j in longs)
    assert ts(short["finished_at"]) < first_long
    assert ts(short["started_at"]) > max(ts(j["started_at"]) for j in longs)


def test_readyz_and_seed_policy_with_a_live_worker(stack, http):
    ready = requests.get(f"{stack.api}/readyz", timeout=5).json()
    assert ready["status"] == "ready" and ready["checks"]["workers"] == "1 live" and "nodes" not in ready
    # A sampled request with a seed follows the serving engine's advertised support (its heartbeat
    # record, shown by GET /v1/nodes): vLLM on CPU cannot honour a seed, on a GPU it can. Accepted, the
    # job must also succeed (an engine that advertised seeds and then failed on one is a bug).
    node = {n["id"]: n for n in http.get(f"{stack.api}/v1/nodes", timeout=10).json()["data"]}[NODE_ID]
    assert isinstance(node["supports_seed"], bool), node
    sampled = http.post(f"{stack.api}/v1/jobs",
                        json={"prompt": "hi", "seed": 1, "temperature": 0.7, "max_tokens": 4})
    print(f"seed policy: {NODE_ID} advertises supports_seed={node['supports_seed']}; a sampled request with "
          f"a seed got {sampled.status_code}")
    if node["supports_seed"]:
        assert sampled.status_code == 202, sampled.text
        assert wait_for(stack, http, sampled.json()["id"])["status"] == "succeeded"
    else:
        assert sampled.status_code == 422 and "seed" in sampled.json()["detail"], sampled.text
    greedy = wait_for(stack, http, submit(stack, http, {"prompt": "hi", "seed": 1, "temperature": 0, "max_tokens": 4})["id"])
    assert greedy["status"] == "succeeded"


def test_flower_shows_the_tasks(stack, http):
    wait_for(stack, http, submit(stack, http, {"prompt": "Flower check", "max_tokens": 4})["id"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tasks = requests.get(f"{stack.flower}/api/tasks", timeout=5).json()
        names = {t.get("name") for t in tasks.values()}
        if "switchyard.route" in names:
            break
        time.sleep(1)
    assert "switchyard.route" in names, names
    workers = requests.get(f"{stack.flower}/api/workers?refresh=1", timeout=30).json()
    assert any(name.startswith("gpu@") for name in workers), workers


@pytest.mark.engine
def test_engine_crash_restarts_the_engine_and_retries_its_jobs(stack, http):
    """Kill the engine core under running jobs: the worker survives, rebuilds the engine, retries them."""
    import psutil

    jobs = [submit(stack, http, COUNTING | {"max_tokens": 512}) for _ in range(4)]
    deadline = time.monotonic() + 60
    while not all(http.get(f"{stack.api}/v1/jobs/{j['id']}").json()["status"] == "running" for j in jobs):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    worker = psutil.Process(stack.procs["worker"].pid)
    cores = [p for p in worker.children(recursive=True) if "EngineCore" in p.name()]
    assert cores, [p.name() for p in worker.children(recursive=True)]
    for p in cores:
        p.kill()
    done = [wait_for(stack, http, j["id"]) for j in jobs]
    assert [j["status"] for j in done] == ["succeeded"] * 4, [j["error"] for j in done]
    assert all(j["attempt"] == 2 for j in done)
    assert stack.procs["worker"].poll() is None
    ready = requests.get(f"{stack.api}/readyz", timeout=5)
    assert ready.status_code == 200
