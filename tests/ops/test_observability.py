"""Prometheus and Grafana: every series the dashboard or a rule queries is one the code exports, the rules
are well formed, and the scrape configuration reaches each process where it serves its metrics.

The exported names come from the registries the code builds: tasks.metrics' objects, the cluster-state
collector run against real Redis and Postgres with a live node, the SimulatedEngine's statistics, and
Flower's own metrics object; vLLM's names are read from the installed vLLM's metrics source (building
its stat logger needs a whole model configuration). No list of names is written here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import redis as redis_lib
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

from tasks.db import make_pool
from tasks.metrics.engine import SimulatedEngineStats
from tasks.metrics.exposition import ROLE_PORTS
from tasks.metrics.state import StateCollector
from tasks.routing import registry as node_registry

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "ops" / "prometheus"
GRAFANA = REPO / "ops" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "switchyard.json"

#: series Prometheus makes itself for every target
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
#: the alerts issue 13 asks for: node down, dead letters growing, p99 latency over a target, queue depth
#: rising, webhook failure rate, reconciler re-routing
REQUIRED_ALERTS = {"SwitchyardNodeDown", "SwitchyardDeadLettersGrowing", "SwitchyardApiLatencyHigh",
                   "SwitchyardQueueDepthRising", "SwitchyardWebhookFailureRate", "SwitchyardReconcilerRerouting"}


# --- PromQL: the metric names an expression reads ------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
             "unless", "inf", "nan", "atan2"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers that are neither functions nor aggregations
    (followed by `(`), keywords, label names (inside `{}` or a grouping clause) nor durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables ($__rate_interval)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = _GROUPING.sub("", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        before = expr[match.start() - 1] if match.start() else " "
        after = expr[match.end():].lstrip()
        if before.isdigit() or before == ".":  # the tail of a number: 1e3, 0.5
            continue
        if after.startswith("(") or match.group() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


@pytest.mark.parametrize("expr, names", [
    ('sum by (le, route) (rate(switchyard_x_bucket{route!~"/a|b", wait="false"}[5m]))', {"switchyard_x_bucket"}),
    ("histogram_quantile(0.99, sum by (le) (rate(a_bucket[$__rate_interval]))) > 1.5e3", {"a_bucket"}),
    ("max by (node) (b == 0) unless on (node) max by (node) (c == 1)", {"b", "c"}),
    ("sum(rate(vllm:generation_tokens_total[1m])) / sum (d offset 5m) and on () e > bool 2",
     {"vllm:generation_tokens_total", "d", "e"}),
    ('up{job="switchyard-worker"} == 0 or absent(f)', {"up", "f"}),
])
def test_promql_names_are_found(expr, names):
    assert promql_metric_names(expr) == names


# --- what the code exports ------------------------------------------------------------------------------


def _sample_names(family) -> set[str]:
    base = family.name
    if family.type == "counter":
        return {f"{base}_total", f"{base}_created"}
    if family.type == "histogram":
        return {f"{base}_bucket", f"{base}_count", f"{base}_sum", f"{base}_created"}
    if family.type == "summary":
        return {base, f"{base}_count", f"{base}_sum", f"{base}_created"}
    return {base}


def _vllm_names() -> set[str]:
    """Every `vllm:*` sample name the installed vLLM's Prometheus stat logger defines."""
    spec = importlib.util.find_spec("vllm")  # located, not imported (importing vLLM loads torch)
    assert spec is not None, "vLLM is a dependency of every install (the cpu or gpu extra)"
    source = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    found = re.findall(r'_(gauge|counter|histogram)_cls\(\s*name="(vllm:[a-z_:]+)"', source)
    assert len(found) > 10, "vLLM's stat logger no longer defines its metrics where this test looks"
    suffixes = {"gauge": [""], "counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    return {name + s for kind, name in found for s in suffixes[kind]}


@pytest.fixture(scope="module")
def exported(backing) -> set[str]:
    from flower.events import get_prometheus_metrics

    from workers.simulated import SimulatedEngine

    pg, valkey = backing
    client = redis_lib.Redis.from_url(valkey.url.rsplit("/", 1)[0] + "/7")
    client.flushdb()
    # a live node and a message, so the state collector has every kind of series to show
    node_registry.heartbeat(client, {"id": "obs-node", "models": ["m"], "engine_state": "ready"}, ttl=60)
    get_prometheus_metrics()  # Flower's metrics object, as Flower builds it (in the default registry)
    import tasks.metrics  # noqa: F401 - every Switchyard metric object, in the default registry

    own = CollectorRegistry()
    with make_pool(pg.url, max_size=1, name="observability") as pool:
        own.register(StateCollector(client, pool))
        own.register(SimulatedEngineStats(SimulatedEngine(token_seconds=1, max_num_seqs=1, tokenizer=None), "m"))
        families = [*REGISTRY.collect(), *own.collect()]
    client.close()
    names = {n for family in families for n in _sample_names(family)}
    assert {"switchyard_node_up", "switchyard_backend_up", "switchyard_http_request_duration_seconds_bucket"} <= names
    simulated = {n for f in families if f.name.startswith("vllm:") for n in _sample_names(f) if not n.endswith("_created")}
    assert simulated and simulated <= _vllm_names(), "the SimulatedEngine reports a series vLLM does not have"
    return names | _vllm_names() | PROMETHEUS_SERIES


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
            for rule in group["rules"]]


def _dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def unknown_series(exprs: list[tuple[str, str]], known: set[str]) -> list[str]:
    return [f"{where}: {name}" for where, expr in exprs for name in sorted(promql_metric_names(expr) - known)]


def test_every_series_queried_is_one_the_code_exports(exported):
    rules = _rules()
    recorded = {r["record"] for r in rules if "record" in r}
    exprs = [(r.get("alert") or r["record"], r["expr"]) for r in rules]
    exprs += _dashboard_exprs(json.loads(DASHBOARD.read_text()))
    assert len(exprs) > 30
    assert unknown_series(exprs, exported | recorded) == []


def test_a_series_nobody_exports_is_caught(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"][1]["targets"][0]["expr"] = "sum(rate(switchyard_http_requests_total[5m]))"  # a guess
    assert unknown_series(_dashboard_exprs(dashboard), exported) == [
        f"{dashboard['panels'][1]['title']}: switchyard_http_requests_total"]


# --- the rules ------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def _balanced(expr: str) -> bool:
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def test_rules_are_well_formed():
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    assert len({g["name"] for g in groups}) == len(groups)
    alerts = [r for r in _rules() if "alert" in r]
    records = [r for r in _rules() if "record" in r]
    assert len({r["alert"] for r in alerts}) == len(alerts)
    assert REQUIRED_ALERTS <= {r["alert"] for r in alerts}
    for rule in records:
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]  # level:metric:ops
        assert set(rule) == {"record", "expr"} and _balanced(rule["expr"]), rule
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
        assert _balanced(rule["expr"]), rule["alert"]
        assert "for" not in rule or _DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        for text in rule["annotations"].values():  # templates read only the alert's labels and value
            for template in re.findall(r"\{\{(.*?)\}\}", text):
                assert re.fullmatch(r"\s*\$(labels\.\w+|value)(\s*\|\s*\w+)?\s*", template), (rule["alert"], template)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_rules_and_the_configuration(tmp_path):
    assert subprocess.run(["promtool", "check", "rules", PROMETHEUS / "rules.yml"], capture_output=True).returncode == 0
    config = (PROMETHEUS / "prometheus.yml").read_text().replace("/etc/prometheus/", f"{PROMETHEUS}/")
    (tmp_path / "prometheus.yml").write_text(config)
    checked = subprocess.run(["promtool", "check", "config", tmp_path / "prometheus.yml"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- the dashboard and its provisioning -------------------------------------------------------------------


def test_dashboard_is_well_formed_and_uses_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [source] = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and dashboard["uid"]
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for panel in graphs:
        assert panel["title"] and panel["targets"], panel
        assert panel["datasource"]["uid"] == source["uid"]
        assert all(t["refId"] and t["expr"].strip() and t["datasource"]["uid"] == source["uid"] for t in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    titles = " ".join(p["title"].lower() for p in graphs)
    for subject in ("api", "queue", "job", "batch", "tokens", "kv cache", "prefix cache", "ewma", "cooldown",
                    "reconciler", "webhook", "retrieval", "celery"):
        assert subject in titles, f"no panel about {subject}"


def test_compose_mounts_what_prometheus_and_grafana_read():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "switchyard.yml").read_text())
    [dashboards] = provider["providers"]

    def mounts(service: str) -> dict[str, Path]:
        return {v.split(":")[1]: (REPO / v.split(":")[0]).resolve() for v in compose[service]["volumes"]
                if v.startswith("./")}

    grafana = mounts("grafana")
    assert grafana["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    assert grafana[dashboards["options"]["path"]] == DASHBOARD.parent
    home = compose["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards['options']['path']}/{DASHBOARD.name}"
    prometheus_mounts = mounts("prometheus")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    for path in ["/etc/prometheus/prometheus.yml", *config["rule_files"]]:
        folder, name = path.rsplit("/", 1)
        assert (prometheus_mounts[folder] / name).is_file(), path
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["prometheus"]["command"]


# --- scraping: each process where it serves ---------------------------------------------------------------

#: the entry module of each compose service whose metrics Prometheus scrapes → its scrape job
_JOBS = {"api.wsgi": "switchyard-api", "workers.router": "switchyard-router", "workers.gpu": "switchyard-worker",
         "workers.webhook_worker": "switchyard-webhooks", "workers.ingest_worker": "switchyard-ingest",
         "tasks.app": "flower"}


def _role(module: str) -> str:
    """The process kind a Celery entry module runs as: its worker hostname's prefix (`router@…`)."""
    source = (REPO / Path(*module.split("."))).with_suffix(".py").read_text()
    [role] = re.findall(r'hostname=f"(\w+)@', source)
    return role


def _targets(job: dict) -> set[tuple[str, int]]:
    found = {(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for c in job.get("static_configs", []) for t in c["targets"]}
    found |= {(name, c["port"]) for c in job.get("dns_sd_configs", []) for name in c["names"]}
    return found


def test_every_metrics_endpoint_is_scraped_where_it_listens():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    seen = set()
    for name, service in compose.items():
        argv = service.get("command") or []
        module = next((a.split(":")[0] for a in argv if a.split(":")[0] in _JOBS), None)
        if module is None and "-m" in argv:
            module = argv[argv.index("-m") + 1]
        if module not in _JOBS:
            continue
        if module == "api.wsgi":
            port = int(argv[argv.index("-b") + 1].rsplit(":", 1)[1])
        elif module == "tasks.app":
            port = int(next(a for a in argv if a.startswith("--port=")).split("=")[1])
        else:
            port = ROLE_PORTS[_role(module)]
            # the health check asks that same port
            assert f"localhost:{port}/metrics" in " ".join(service["healthcheck"]["test"]), name
        aliases = {name, *service.get("networks", {}).get("default", {}).get("aliases", [])}
        targets = _targets(jobs[_JOBS[module]])
        assert any(host in aliases and p == port for host, p in targets), (name, targets)
        seen.add(_JOBS[module])
    assert seen == set(jobs), f"scrape jobs with no service behind them: {set(jobs) - seen}"
    # Celery processes listen beyond loopback inside their containers (Prometheus is another container)
    assert compose["router"]["environment"]["SWITCHYARD_METRICS_ADDR"] == "0.0.0.0"
