"""docker-compose.yml: valid against the Compose Specification schema, and wired the way the code expects.

No Docker engine is needed: the file is read with PyYAML (which resolves anchors and `<<:` merge keys,
as Compose does) and checked against the vendored schema (tests/ops/compose-spec.json, see README.md).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
SCHEMA_FILE = Path(__file__).resolve().parent / "compose-spec.json"

EXPECTED_SERVICES = {"redis", "postgres", "migrate", "api", "router", "worker", "worker-cpu", "webhooks", "ingest",
                     "flower", "prometheus", "grafana"}
APP_SERVICES = ("api", "router", "worker", "worker-cpu", "webhooks", "ingest", "flower")
#: run once and exit (restart "no"): no health check, others wait for them to complete
ONE_SHOT = {"migrate", "model"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema.get("$id") == "compose_spec.json" and "service" in schema["definitions"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, document) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]


def _argv(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


# --- the schema ---------------------------------------------------------------------------------------


def test_compose_file_is_valid_against_compose_spec(compose, validator):
    assert _errors(validator, compose) == []


@pytest.mark.parametrize("breakage", ["unknown_service_key", "bad_device_reservation", "bad_depends_condition"])
def test_schema_rejects_a_broken_compose_file(compose, validator, breakage):
    broken = json.loads(json.dumps(compose))  # no shared (anchored) objects: change one place only
    if breakage == "unknown_service_key":
        broken["services"]["api"]["imagee"] = broken["services"]["api"].pop("image")
        expected = "imagee"
    elif breakage == "bad_device_reservation":
        # `capabilities` is required, and `gpus` is no key of a device reservation.
        broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"] = [
            {"driver": "nvidia", "count": 1, "gpus": "all"}
        ]
        expected = "devices"
    else:
        broken["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_finished"
        expected = "depends_on"
    errors = _errors(validator, broken)
    assert errors, f"schema accepted a compose file with {breakage}"
    assert any(expected in e for e in errors), errors


# --- structural promises --------------------------------------------------------------------------------


def test_expected_services_exist(compose):
    assert EXPECTED_SERVICES <= set(compose["services"])


def test_worker_reserves_an_nvidia_gpu(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and d.get("count") in (1, "1")
               for d in devices), devices
    assert worker["build"]["args"]["EXTRAS"] == "gpu"
    env = _environment(worker)
    assert env["SWITCHYARD_MODEL_PATH"] == "/models/SmolLM2-135M-Instruct"
    assert env.get("SWITCHYARD_NODE_ID")
    assert any(str(v).split(":")[:2] == ["models", "/models"] for v in worker["volumes"]), worker["volumes"]
    # vLLM's compile cache outlives the container (a compiled engine then loads instead of compiling),
    # at the app user's cache, which the image creates owned by that user so the new volume is writable.
    assert "vllm-cache:/home/switchyard/.cache/vllm" in worker["volumes"] and "vllm-cache" in compose["volumes"]
    dockerfile = (Path(__file__).parents[2] / "ops" / "Dockerfile").read_text()
    assert "mkdir -p /models /home/switchyard/.cache/vllm" in dockerfile and "USER switchyard" in dockerfile
    assert worker["stop_grace_period"] == "2m"


def test_redis_is_durable_and_never_evicts(compose):
    redis = compose["services"]["redis"]
    argv = _argv(redis["command"])
    assert "--appendonly" in argv and argv[argv.index("--appendonly") + 1] == "yes", argv
    assert "--maxmemory-policy" in argv and argv[argv.index("--maxmemory-policy") + 1] == "noeviction", argv
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    assert "redis-cli" in _argv(redis["healthcheck"]["test"])


SECRET = re.compile(r"\$\{(SWITCHYARD_[A-Z_]+):\?[^}]+\}")  # ${VAR:?message}: compose refuses to start unset


def _secret(value: str) -> str:
    """The environment variable a required secret comes from (fails if the value is written out)."""
    match = SECRET.fullmatch(str(value)) or SECRET.search(str(value))
    assert match, f"{value!r} is not a required ${{SWITCHYARD_...:?...}} secret"
    return match.group(1)


def test_postgres_matches_the_database_url(compose):
    pg = compose["services"]["postgres"]
    assert pg["image"].startswith("pgvector/pgvector:")
    env = _environment(pg)
    owner = _environment(compose["services"]["migrate"])["DATABASE_URL"]
    assert re.fullmatch(rf"postgresql://postgres:\$\{{[^}}]+\}}@postgres:5432/{env['POSTGRES_DB']}", owner), owner
    assert _secret(owner) == _secret(env["POSTGRES_PASSWORD"]) == "SWITCHYARD_POSTGRES_PASSWORD"
    # every other service connects as the least-privileged role the migrate service makes
    assert "app-role switchyard_app" in " ".join(_argv(compose["services"]["migrate"]["command"]))
    for name in APP_SERVICES:
        if name != "migrate":
            url = _environment(compose["services"][name])["DATABASE_URL"]
            assert re.fullmatch(rf"postgresql://switchyard_app:\$\{{[^}}]+\}}@postgres:5432/{env['POSTGRES_DB']}", url)
            assert _secret(url) == "SWITCHYARD_APP_DB_PASSWORD"
    assert "pg_isready" in " ".join(_argv(pg["healthcheck"]["test"]))


def test_secrets_come_from_the_environment_and_flower_is_guarded(compose):
    services = compose["services"]
    redis_argv = _argv(services["redis"]["command"])
    password = redis_argv[redis_argv.index("--requirepass") + 1]
    assert _secret(password) == _secret(_environment(services["redis"])["REDISCLI_AUTH"]) == "SWITCHYARD_REDIS_PASSWORD"
    assert _secret(_environment(services["api"])["REDIS_URL"]) == "SWITCHYARD_REDIS_PASSWORD"
    flower = services["flower"]
    assert _secret(_environment(flower)["FLOWER_BASIC_AUTH"]) == "SWITCHYARD_FLOWER_LOGIN"
    assert [str(p) for p in flower["ports"]] == ["127.0.0.1:5555:5555"]  # loopback only
    example = (REPO / "ops" / "compose.env.example").read_text()
    for name in ("SWITCHYARD_POSTGRES_PASSWORD", "SWITCHYARD_APP_DB_PASSWORD", "SWITCHYARD_REDIS_PASSWORD",
                 "SWITCHYARD_FLOWER_LOGIN", "SWITCHYARD_SECRETS_KEY"):
        assert f"{name}=" in example
    assert ".env" in (REPO / ".gitignore").read_text().split()


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_get_database_and_redis_urls(compose, name):
    env = _environment(compose["services"][name])
    assert env.get("DATABASE_URL", "").startswith("postgresql://"), env
    assert re.fullmatch(r"redis://:\$\{[^}]+\}@redis:6379/\d+", env.get("REDIS_URL", "")), env
    assert str(env.get("HF_HUB_OFFLINE")) == "1", env


def test_startup_order(compose):
    services = compose["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    api_deps = services["api"]["depends_on"]
    assert api_deps["redis"]["condition"] == "service_healthy"
    assert api_deps["postgres"]["condition"] == "service_healthy"
    assert api_deps["migrate"]["condition"] == "service_completed_successfully"
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_api_serves_and_checks_healthz(compose):
    api = compose["services"]["api"]
    assert "8000:8000" in [str(p) for p in api["ports"]]
    argv = _argv(api["command"])
    assert argv[0] == "gunicorn" and "0.0.0.0:8000" in argv and "api.wsgi:app" in argv
    assert "http://localhost:8000/healthz" in " ".join(_argv(api["healthcheck"]["test"]))


def test_named_build_files_exist(compose):
    builds = [s["build"] for s in compose["services"].values() if "build" in s]
    assert builds
    for build in builds:
        build = {"context": build} if isinstance(build, str) else build
        context = REPO / build.get("context", ".")
        assert context.is_dir(), context
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{dockerfile} named in docker-compose.yml does not exist"


def _module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_entry_modules_exist(compose):
    """Every `python -m X`, `gunicorn ... module:app` and `celery -A module` names a module in the repo."""
    checked = []
    for name, service in compose["services"].items():
        if "command" not in service:
            continue
        argv = _argv(service["command"])
        if argv[:2] == ["sh", "-c"]:  # a shell line: its `python -m X` commands
            modules = re.findall(r"python -m ([\w.]+)", argv[2])
            for module in modules:
                assert _module_file(module), f"{name}: module {module} has no file in the repository"
                checked.append(module)
            continue
        if argv[0].startswith("python") and "-m" in argv:
            modules = [argv[argv.index("-m") + 1]]
        elif argv[0] == "gunicorn":
            app = argv[-1]  # gunicorn [OPTIONS] APP_MODULE
            assert re.fullmatch(r"[A-Za-z_][\w.]*:\w+", app), f"{name}: {app!r} is not module:variable"
            modules = [app.split(":")[0]]
            conf = argv[argv.index("-c") + 1] if "-c" in argv else None
            if conf:
                assert (REPO / conf).is_file(), f"{name}: gunicorn config {conf} missing"
        elif argv[0] == "celery":
            modules = [argv[argv.index("-A") + 1]]
        else:
            continue
        assert modules, f"{name}: no module found in {argv}"
        for module in modules:
            assert _module_file(module), f"{name}: module {module} has no file in the repository"
            checked.append(module)
    assert {"ops.admin", "workers.router", "workers.gpu", "workers.ingest_worker", "api.wsgi",
            "tasks.app"} <= set(checked), checked


def test_cpu_variant_of_the_worker_runs_the_same_worker_without_a_gpu(compose):
    services = compose["services"]
    gpu, cpu = services["worker"], services["worker-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]  # one or the other (COMPOSE_PROFILES)
    assert _argv(cpu["command"]) == _argv(gpu["command"]) == ["python", "-m", "workers.gpu"]
    assert cpu["build"]["args"]["EXTRAS"] == "cpu" and cpu["image"] == "switchyard:cpu"
    assert "deploy" not in cpu
    env = _environment(cpu)
    assert env["SWITCHYARD_MODEL_PATH"] == _environment(gpu)["SWITCHYARD_MODEL_PATH"]
    assert env.get("SWITCHYARD_NODE_ID") and env.get("SWITCHYARD_KV_CACHE_GIB")
    assert cpu["volumes"] == gpu["volumes"] and cpu["depends_on"] == gpu["depends_on"]
    assert cpu["healthcheck"] == gpu["healthcheck"]
    # Prometheus scrapes `worker`: whichever of the two runs answers to that name
    assert "worker" in cpu["networks"]["default"]["aliases"]
    example = (REPO / "ops" / "compose.env.example").read_text()
    assert re.search(r"^COMPOSE_PROFILES=(gpu|cpu)$", example, re.M), "the example .env picks no worker"


def test_every_long_running_service_has_a_health_check_and_waits_on_conditions(compose):
    services = compose["services"]
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no", name
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert {"interval", "timeout", "retries"} <= set(check), name
        deps = service.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on without conditions"
        for dep, rule in deps.items():
            wanted = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert rule["condition"] == wanted, (name, dep, rule)
            assert dep in ONE_SHOT or services[dep].get("healthcheck"), f"{name} waits on {dep}, which has no health check"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_monitoring_is_pinned_guarded_and_on_loopback_only(compose):
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: {image} is not pinned to a release"
    grafana = _environment(services["grafana"])
    assert _secret(grafana["GF_SECURITY_ADMIN_PASSWORD"]) == "SWITCHYARD_GRAFANA_ADMIN_PASSWORD"
    assert str(grafana["GF_USERS_ALLOW_SIGN_UP"]) == "false"
    assert "SWITCHYARD_GRAFANA_ADMIN_PASSWORD=" in (REPO / "ops" / "compose.env.example").read_text()
    assert [str(p) for p in services["prometheus"]["ports"]] == ["127.0.0.1:9090:9090"]
    assert [str(p) for p in services["grafana"]["ports"]] == ["127.0.0.1:3000:3000"]
    # nothing but the API is published beyond the host's loopback
    for name, service in services.items():
        for port in service.get("ports", []):
            assert name == "api" or str(port).startswith("127.0.0.1:"), (name, port)
