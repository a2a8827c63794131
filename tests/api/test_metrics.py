"""The API's metrics: requests timed by route (the URL rule), method, status and whether they wait, in
process; and GET /metrics adding up several real processes' numbers in multiprocess mode, as gunicorn's
workers are (tests/system/api/test_metrics.py runs gunicorn itself)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

from tests.support import auth, metric_samples, metric_value

DURATION_COUNT = "switchyard_http_request_duration_seconds_count"


def _scrape(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    return metric_samples(response.get_data(as_text=True))


def test_requests_are_counted_by_route_rule_status_and_wait(client, api_redis, tenant):
    _, key = tenant
    before = _scrape(client)
    missing = uuid.uuid4()
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
    assert client.get(f"/v1/jobs/{missing}", headers=auth(key)).status_code == 404
    assert client.get(f"/v1/jobs/{uuid.uuid4()}?wait=1", headers=auth(key)).status_code == 404
    assert client.get("/v1/jobs", headers={}).status_code == 401
    assert client.get(f"/no/such/{uuid.uuid4()}").status_code == 404
    after = _scrape(client)

    def grew(**labels) -> float:
        return metric_value(after, DURATION_COUNT, **labels) - metric_value(before, DURATION_COUNT, **labels)

    assert grew(method="GET", route="/healthz", status="200", wait="false") == 3
    # the rule, never the path: one series however many job ids are asked for
    assert grew(method="GET", route="/v1/jobs/<uuid:job_id>", status="404", wait="false") == 1
    assert grew(method="GET", route="/v1/jobs/<uuid:job_id>", status="404", wait="true") == 1
    assert grew(method="GET", route="/v1/jobs", status="401", wait="false") == 1
    assert grew(method="GET", route="<unmatched>", status="404", wait="false") == 1
    assert not [k for k in after if k[0] == DURATION_COUNT and str(missing) in str(k[1])]
    # nothing is left "in progress" once the requests are answered
    in_progress = {k: v for k, v in after.items() if k[0] == "switchyard_http_requests_in_progress"
                   and dict(k[1])["route"] != "/metrics"}
    assert in_progress and not any(in_progress.values()), in_progress


def test_metrics_carries_the_cluster_state(client, api_redis):
    api_redis.rpush("webhooks", b"m1", b"m2")
    samples = _scrape(client)
    assert metric_value(samples, "switchyard_backend_up", backend="redis") == 1
    assert metric_value(samples, "switchyard_backend_up", backend="postgres") == 1
    assert metric_value(samples, "switchyard_queue_depth", queue="webhooks") == 2
    assert ("switchyard_jobs", frozenset({"status": "queued"}.items())) in samples


# --- multiprocess mode: separate processes, one folder, one /metrics -----------------------------------

_CHILD = textwrap.dedent("""
    import sys
    from api import create_app
    from tasks.settings import Settings

    app = create_app(Settings(database_url=sys.argv[1], redis_url=sys.argv[2]))
    client = app.test_client()
    for _ in range(int(sys.argv[3])):
        assert client.get("/healthz").status_code == 200
    if sys.argv[4] == "scrape":
        sys.stdout.write(client.get("/metrics").get_data(as_text=True))
""")


def _run(settings, metrics_dir, requests: int, scrape: bool) -> subprocess.Popen:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    return subprocess.Popen([sys.executable, "-c", _CHILD, settings.database_url, settings.redis_url,
                             str(requests), "scrape" if scrape else "-"], env=env, stdout=subprocess.PIPE,
                            text=True)


def test_metrics_adds_up_every_process_of_the_multiprocess_folder(api_settings, tmp_path):
    writers = [_run(api_settings, tmp_path, n, scrape=False) for n in (3, 5)]  # two processes at once
    for proc in writers:
        proc.communicate(timeout=120)
        assert proc.returncode == 0
    scraper = _run(api_settings, tmp_path, 2, scrape=True)  # a third process serves /metrics
    out, _ = scraper.communicate(timeout=120)
    assert scraper.returncode == 0
    pids = {p.stem.rsplit("_", 1)[-1] for p in tmp_path.glob("histogram_*.db")}
    assert len(pids) == 3, sorted(tmp_path.iterdir())  # each process wrote its own file
    samples = metric_samples(out)  # raises on a sample exported twice
    assert metric_value(samples, DURATION_COUNT, method="GET", route="/healthz", status="200", wait="false") == 10
    # state is the scraping process's reading, once, not one per process
    assert metric_value(samples, "switchyard_backend_up", backend="redis") == 1
