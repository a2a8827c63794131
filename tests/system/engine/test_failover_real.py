"""Failover with the real vLLM engine: a second GPU worker joins, takes half the jobs, and is killed with
SIGKILL (its whole process group, engine core included) while generating. Its jobs are re-routed to the
surviving node and finish there as attempt 2."""

from __future__ import annotations

import signal
import sys
import time

from tests.system.engine.support import NODE_ID
from tests.system.engine.test_job_path import COUNTING, submit, ts, wait_for

SECOND = "test-gpu-1"


def live(stack, http) -> dict[str, dict]:
    return {n["id"]: n for n in http.get(f"{stack.api}/v1/nodes", timeout=10).json()["data"]}


def test_sigkill_a_real_vllm_node_mid_generation(stack, http):
    stack.start(SECOND, [sys.executable, "-m", "workers.gpu"], SWITCHYARD_NODE_ID=SECOND)
    deadline = time.monotonic() + 240
    while not live(stack, http).get(SECOND, {}).get("routable"):
        assert time.monotonic() < deadline and stack.procs[SECOND].poll() is None, stack.log(SECOND)
        time.sleep(1)

    jobs = [submit(stack, http, COUNTING | {"max_tokens": 160, "routing": {"strategy": "round_robin"}})
            for _ in range(6)]
    ids = [j["id"] for j in jobs]
    while True:  # kill once the second node is generating
        rows = [http.get(f"{stack.api}/v1/jobs/{i}", timeout=10).json() for i in ids]
        mine = [r["id"] for r in rows if r["node_id"] == SECOND and r["status"] == "running"]
        if mine:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
    held = [r["id"] for r in rows if r["node_id"] == SECOND and r["status"] in ("routed", "running")]
    killed_at = time.time()
    stack.signal(SECOND, signal.SIGKILL)  # the worker and its EngineCore, no warning

    done = {i: wait_for(stack, http, i) for i in ids}
    rerouted = [done[i] for i in held]
    reroute_s = [ts(d["routed_at"]).timestamp() - killed_at for d in rerouted]
    print(f"real-engine failover: {len(held)} job(s) on {SECOND} at the kill, re-routed "
          f"{min(reroute_s):.1f}..{max(reroute_s):.1f} s after it")
    assert all(d["status"] == "succeeded" and d["result"]["text"].strip() for d in done.values())
    assert all(d["node_id"] == NODE_ID and d["attempt"] == 2 for d in rerouted)
    assert max(reroute_s) <= 15.0
    # The dead node leaves the registry (its heartbeat expires), so later tests see one node.
    while SECOND in live(stack, http):
        time.sleep(0.5)
