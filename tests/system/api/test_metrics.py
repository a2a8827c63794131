"""Metrics on real processes: the API under gunicorn (two workers, ops/gunicorn.conf.py) adds up both
workers' requests at GET /metrics, starts from an emptied folder and drops a killed worker's live gauges;
a router and a GPU worker (SimulatedEngine) each serve their own registry on their own port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import requests
from prometheus_client.mmap_dict import MmapedDict

from ops.services import free_port
from tests.support import metric_samples, metric_value

HEALTHZ = {"method": "GET", "route": "/healthz", "status": "200", "wait": "false"}
COUNT = "switchyard_http_request_duration_seconds_count"


def _pids(metrics_dir, kind: str) -> set[str]:
    return {p.stem.rsplit("_", 1)[-1] for p in metrics_dir.glob(f"{kind}_*.db")}


def _served_healthz(metrics_dir) -> dict[str, float]:
    """{pid: /healthz requests} from each process's own histogram file."""
    served = {}
    for path in metrics_dir.glob("histogram_*.db"):
        values = MmapedDict.read_all_values_from_file(str(path))
        keys = [(json.loads(key), value) for key, value, _ts, _pos in values]
        # a histogram's file keeps one (non-cumulative) count per bucket: they add up to its requests
        served[path.stem.rsplit("_", 1)[-1]] = sum(
            value for (_metric, name, labels, _help), value in keys
            if name == COUNT.replace("_count", "_bucket") and labels.get("route") == "/healthz")
    return served


def _scrape(url: str) -> dict:
    response = requests.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    return metric_samples(response.text)


def _workers(cluster) -> list[psutil.Process]:
    return psutil.Process(cluster.pid("api")).children()


def test_api_metrics_add_up_gunicorn_workers(make_cluster, tmp_path):
    metrics_dir = tmp_path / "api-metrics"
    metrics_dir.mkdir()
    # What an earlier server left there must not count: 7 requests of a process long gone.
    stale = subprocess.run([sys.executable, "-c", "from tasks import metrics\nfor _ in range(7): "
                            "metrics.observe_request('GET', '/healthz', 200, False, 0.01)"],
                           env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, check=False)
    assert stale.returncode == 0 and _pids(metrics_dir, "histogram")
    cluster = make_cluster(metrics_dir=str(metrics_dir), api_workers="2")
    cluster.start_api()
    cluster.wait_api()
    assert len(_workers(cluster)) == 2
    assert not (_pids(metrics_dir, "histogram") - {str(p.pid) for p in _workers(cluster)})  # emptied at start

    sent = sum(_served_healthz(metrics_dir).values())  # wait_api's
    while sum(n > 0 for n in _served_healthz(metrics_dir).values()) < 2 and sent < 600:  # until both served
        for _ in range(20):
            assert requests.get(f"{cluster.api}/healthz", headers={"Connection": "close"}, timeout=5).ok
        sent += 20
    served = _served_healthz(metrics_dir)
    assert sorted(served) == sorted(str(p.pid) for p in _workers(cluster)) and all(served.values()), served
    samples = _scrape(cluster.api)  # whichever worker answers, it reports both
    assert metric_value(samples, COUNT, **HEALTHZ) == sent == sum(served.values())
    print(f"{sent} requests over 2 gunicorn workers, /metrics counted {metric_value(samples, COUNT, **HEALTHZ):.0f}")

    victim = _workers(cluster)[0].pid
    assert str(victim) in _pids(metrics_dir, "gauge_livesum")  # its requests-in-progress gauge
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (victim in [p.pid for p in _workers(cluster)] or len(_workers(cluster)) < 2):
        time.sleep(0.2)
    assert victim not in [p.pid for p in _workers(cluster)] and len(_workers(cluster)) == 2
    assert str(victim) not in _pids(metrics_dir, "gauge_livesum")  # marked dead: its live gauges are gone
    samples = _scrape(cluster.api)
    assert metric_value(samples, COUNT, **HEALTHZ) == sent  # a counter never goes down with its worker


def test_router_and_worker_serve_their_own_metrics(make_cluster):
    cluster = make_cluster()
    router_port, worker_port = free_port(), free_port()
    cluster.start_router(SWITCHYARD_METRICS_PORT=str(router_port))
    cluster.start_worker("sim-0", SWITCHYARD_METRICS_PORT=str(worker_port))
    cluster.start_api()
    cluster.wait_nodes(["sim-0"])
    cluster.wait_api()
    ids = cluster.submit(cluster.tenant.id, 6, max_tokens=8)
    assert {r["status"] for r in cluster.wait_terminal(ids)} == {"succeeded"}

    worker = metric_samples(requests.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=10).text)
    assert metric_value(worker, "switchyard_batch_size_sum") == 6
    assert metric_value(worker, "switchyard_job_phase_seconds_count", phase="generation") == 6
    engine = {"model_name": cluster.settings.model_name, "engine": "0"}
    assert metric_value(worker, "vllm:generation_tokens_total", **engine) == 6 * 8
    assert metric_value(worker, "vllm:num_requests_running", **engine) == 0
    router = metric_samples(requests.get(f"http://127.0.0.1:{router_port}/metrics", timeout=10).text)
    assert any(name.startswith("process_") for name, _ in router)
    assert not [k for k in router if k[0].startswith("vllm:")]  # each process reports itself only

    api = _scrape(cluster.api)
    assert metric_value(api, "switchyard_node_up", node="sim-0") == 1
    assert metric_value(api, "switchyard_node_info", node="sim-0", engine="simulated",
                        model=cluster.settings.model_name) == 1
    assert metric_value(api, "switchyard_queue_depth", queue="node.sim-0") == 0
    assert metric_value(api, "switchyard_batch_size_count") == 0  # batches are the worker's to report
