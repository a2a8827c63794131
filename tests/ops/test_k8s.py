"""ops/k8s: the kustomize overlays render, every object is valid against the Kubernetes and KEDA schemas,
and the manifests are wired the way the code expects.

No kubectl, kustomize or cluster is needed. `render` applies the part of kustomize the overlays use
(resources, patches, images, namespace) and refuses any other kustomization field; where kubectl is
installed, its rendering is compared with `kubectl kustomize`'s. The objects are checked against the
schemas vendored in tests/ops/k8s-schemas/ (their origin is in README.md): Kubernetes v1.31's, strict
(an unknown field is an error, as with kubectl's default field validation), and KEDA v2.20's CRDs,
made strict the same way here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import psycopg
import pytest
import yaml
from pydantic import AliasChoices

from tasks.jobs.status import ACTIVE_VALUES
from tasks.names import INGEST_QUEUE, WEBHOOKS_QUEUE, route_queue
from tasks.routing import fair_queue
from tasks.routing.strategies import NAMES as STRATEGIES
from tasks.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "ops" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "k8s-schemas"
OVERLAYS = ("gpu", "cpu", "dev")
WORKLOADS = ("Deployment", "StatefulSet", "Job")
#: the docker-compose.yml service each workload runs as
COMPOSE_TWINS = {"api": "api", "router": "router", "gpu-worker": "worker", "webhooks": "webhooks",
                 "ingest": "ingest", "flower": "flower", "migrate": "migrate"}
#: environment variables of Switchyard containers that are not Settings fields (Flower's own login)
FOREIGN_ENV = {"FLOWER_BASIC_AUTH"}


# --- rendering ------------------------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
#: pod spec lists that a strategic merge patch merges item by item on `name` (their patchMergeKey)
MERGED_BY_NAME = {"containers", "initContainers", "env", "volumes"}


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` prints, for the kustomize features these overlays use."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unsupported, f"{directory}: this test's renderer does not implement {sorted(unsupported)}"
    objects = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path"}, f"{directory}: only patch files, which name their target, are rendered"
        for doc in yaml.safe_load_all((directory / patch["path"]).read_text()):
            target = find(objects, doc["kind"], doc["metadata"]["name"])
            objects[objects.index(target)] = _merge(target, doc)
    for image in kustomization.get("images", []):
        for _, container in containers(objects):
            if container["image"].split(":")[0] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in kustomization:
        for obj in objects:
            obj["metadata"]["namespace"] = kustomization["namespace"]
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"{directory}: an object is defined twice: {keys}"
    return objects


def _merge(base, patch, key: str | None = None):
    """A strategic merge patch, as far as these patches need it: maps merge key by key (null deletes a
    key), the MERGED_BY_NAME lists merge item by item, any other list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for k, value in patch.items():
            if value is None:
                merged.pop(k, None)
            else:
                merged[k] = _merge(base[k], value, k) if k in base else value
        return merged
    if key in MERGED_BY_NAME:  # items new to the list come first, as kustomize puts them
        patches = {item["name"]: item for item in patch}
        return ([item for item in patch if item["name"] not in {b["name"] for b in base}]
                + [_merge(item, patches[item["name"]]) if item["name"] in patches else item for item in base])
    return patch


def find(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(objects: list[dict]):
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            yield obj, obj["spec"]["template"]["spec"]


def containers(objects: list[dict]):
    """(workload, container) for every container and init container."""
    for obj, spec in pod_specs(objects):
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield obj, container


def main_container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


@cache
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(render(K8S / "overlays" / overlay))


def fresh(overlay: str) -> list[dict]:
    """A rendering the test may change."""
    return json.loads(json.dumps(rendered(overlay)))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_agrees_with_kubectl_kustomize(overlay):
    printed = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                             text=True, check=True).stdout
    assert sorted(json.dumps(o, sort_keys=True) for o in yaml.safe_load_all(printed) if o) == \
        sorted(json.dumps(o, sort_keys=True) for o in rendered(overlay))


# --- schemas --------------------------------------------------------------------------------------------


def _strict(schema: dict) -> dict:
    """A CRD's OpenAPI schema, refusing fields it does not declare (unless it preserves unknown fields)."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: _strict(s) for name, s in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(s) for s in schema[key]]
    return schema


class Schemas:
    """Validators by (apiVersion, kind): Kubernetes' own kinds and the vendored CRDs'."""

    def __init__(self):
        self.kubernetes = json.loads((SCHEMAS / "kubernetes-v1.31.0-strict.json").read_text())
        self.crds = {}
        for path in SCHEMAS.glob("keda-*.yaml"):
            crd = yaml.safe_load(path.read_text())["spec"]
            version = next(v for v in crd["versions"] if v["storage"])
            self.crds[(f"{crd['group']}/{version['name']}", crd["names"]["kind"])] = _strict(
                version["schema"]["openAPIV3Schema"])
        self.object_meta = self._kubernetes_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")

    def _kubernetes_validator(self, definition: str):
        return jsonschema.Draft202012Validator({**self.kubernetes, "$ref": f"#/$defs/{definition}"})

    @cache
    def validator(self, api_version: str, kind: str):
        if (api_version, kind) in self.crds:
            return jsonschema.Draft202012Validator(self.crds[api_version, kind])
        group, _, version = api_version.rpartition("/")
        gvk = {"group": group, "version": version, "kind": kind}
        for name, definition in self.kubernetes["$defs"].items():
            if gvk in definition.get("x-kubernetes-group-version-kind", []):
                return self._kubernetes_validator(name)
        return None

    def errors(self, obj: dict) -> list[str]:
        validator = self.validator(obj.get("apiVersion"), obj.get("kind"))
        if validator is None:
            return [f"no schema for {obj.get('apiVersion')} {obj.get('kind')}"]
        errors = list(validator.iter_errors(obj))
        if (obj["apiVersion"], obj["kind"]) in self.crds:  # a CRD's schema only says metadata is an object
            errors += self.object_meta.iter_errors(obj["metadata"])
        return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


@pytest.fixture(scope="module")
def schemas() -> Schemas:
    schemas = Schemas()
    for schema in (schemas.kubernetes, *schemas.crds.values()):
        jsonschema.Draft202012Validator.check_schema(schema)
    return schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_its_schema(schemas, overlay):
    objects = rendered(overlay)
    assert objects
    errors = [f"{o['kind']}/{o['metadata']['name']} {e}" for o in objects for e in schemas.errors(o)]
    assert errors == []


def _break(objects: list[dict], breakage: str) -> tuple[dict, str]:
    if breakage == "container_field_typo":
        obj = find(objects, "Deployment", "api")
        main_container(obj)["imagee"] = main_container(obj).pop("image")
        return obj, "'imagee' was unexpected"
    if breakage == "hpa_target_as_text":
        obj = find(objects, "HorizontalPodAutoscaler", "api")
        obj["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] = "70%"
        return obj, "is not of type 'integer'"
    if breakage == "keda_metadata_not_text":  # KEDA's trigger metadata is strings only
        obj = find(objects, "ScaledObject", "ingest")
        obj["spec"]["triggers"][0]["metadata"]["listLength"] = 4
        return obj, "is not of type 'string'"
    obj = find(objects, "ScaledObject", "gpu-worker")
    obj["spec"]["minReplicas"] = obj["spec"].pop("minReplicaCount")
    return obj, "'minReplicas' was unexpected"


@pytest.mark.parametrize("breakage", ["container_field_typo", "hpa_target_as_text", "keda_metadata_not_text",
                                      "keda_unknown_field"])
def test_the_schemas_reject_a_broken_manifest(schemas, breakage):
    obj, expected = _break(fresh("gpu"), breakage)
    errors = schemas.errors(obj)
    assert any(expected in e for e in errors), errors


# --- wiring ---------------------------------------------------------------------------------------------


def _module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__main__.py") if p.is_file()), None)


def _commands(objects):
    """Every command a Switchyard container runs: its own, and its exec probes'."""
    for obj, container in containers(objects):
        if container["image"].startswith("switchyard"):
            yield obj, container["command"]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "exec" in container.get(probe, {}):
                    yield obj, container[probe]["exec"]["command"]


def test_commands_run_modules_of_this_repository():
    checked = set()
    for obj, argv in _commands(rendered("gpu")):
        line = " ".join(argv)
        modules = re.findall(r"python -m ([\w.]+)", line) + re.findall(r"celery -A ([\w.]+)", line)
        if argv[0] == "gunicorn":
            assert (REPO / argv[argv.index("-c") + 1]).is_file(), argv
            modules.append(argv[-1].split(":")[0])
        assert modules, f"{obj['metadata']['name']}: no module in {argv}"
        for module in modules:
            assert _module_file(module), f"{obj['metadata']['name']}: no module {module} in the repository"
            checked.add(module)
    assert {"api.wsgi", "workers.router", "workers.gpu", "workers.webhook_worker", "workers.ingest_worker",
            "tasks.app", "ops.admin", "workers.model", "workers.health"} <= checked


def test_each_workload_runs_what_docker_compose_runs():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    workloads = {o["metadata"]["name"]: o for o, _ in pod_specs(rendered("gpu"))}
    assert set(workloads) == set(COMPOSE_TWINS)
    for name, twin in COMPOSE_TWINS.items():
        assert main_container(workloads[name])["command"] == compose[twin]["command"], name


def _env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def test_every_setting_named_is_a_settings_field(monkeypatch):
    fields = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        fields |= set(alias.choices) if isinstance(alias, AliasChoices) else {f"SWITCHYARD_{name.upper()}"}
    for overlay in OVERLAYS:
        config = find(list(rendered(overlay)), "ConfigMap", "switchyard")["data"]
        assert set(config) <= fields, set(config) - fields
        for obj, container in containers(rendered(overlay)):
            if container["image"].startswith("switchyard"):
                unknown = _env_names(container) - fields - FOREIGN_ENV
                assert not unknown, f"{overlay}: {obj['metadata']['name']}: {unknown} are no settings"
        for obj, _ in pod_specs(rendered(overlay)):
            if main_container(obj)["image"].startswith("switchyard"):
                assert main_container(obj)["envFrom"] == [{"configMapRef": {"name": "switchyard"}}]
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    Settings.from_env()  # the values are valid too


def test_secrets_are_referenced_by_name_and_the_runbook_creates_them():
    """No Secret is committed; every secret key a pod or KEDA reads is one the runbook's
    `kubectl create secret generic NAME --from-literal=KEY=...` commands create."""
    runbook = (REPO / "docs" / "kubernetes.md").read_text()
    created = set()
    # a command runs to the first line that does not end with a backslash
    for command in re.finditer(r"create secret generic ([\w-]+)(.*?)(?<!\\)\n", runbook, re.S):
        created |= {(command[1], key) for key in re.findall(r"--from-literal=(\w+)=", command[2])}
    for overlay in OVERLAYS:
        objects = rendered(overlay)
        assert not [o for o in objects if o["kind"] == "Secret"]
        refs = [e["valueFrom"]["secretKeyRef"] for _, c in containers(objects) for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})]
        used = {(ref["name"], ref["key"]) for ref in refs}
        used |= {(ref["name"], ref["key"]) for o in objects if o["kind"] == "TriggerAuthentication"
                 for ref in o["spec"]["secretTargetRef"]}
        assert used and used <= created, f"{overlay}: not created in docs/kubernetes.md: {used - created}"


def test_api_probes_use_the_health_routes():
    routes = set(re.findall(r'@bp\.get\("([^"]+)"\)', (REPO / "api" / "health.py").read_text()))
    api = main_container(find(list(rendered("gpu")), "Deployment", "api"))
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"] for p in api["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert api[probe]["httpGet"]["path"] in routes
        assert api[probe]["httpGet"]["port"] in ports


def test_gpu_worker_probes_check_its_own_heartbeat():
    worker = main_container(find(list(rendered("gpu")), "Deployment", "gpu-worker"))
    assert worker["startupProbe"]["exec"]["command"] == ["python", "-m", "workers.health", "--ready"]
    assert worker["readinessProbe"]["exec"]["command"] == ["python", "-m", "workers.health", "--ready"]
    assert worker["livenessProbe"]["exec"]["command"] == ["python", "-m", "workers.health"]
    node_id = next(e for e in worker["env"] if e["name"] == "SWITCHYARD_NODE_ID")
    assert node_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # unique per pod
    assert worker["startupProbe"]["initialDelaySeconds"] > Settings().heartbeat_ttl


def test_grace_periods_let_each_process_finish_its_work(monkeypatch):
    objects = list(rendered("gpu"))
    for key, value in find(objects, "ConfigMap", "switchyard")["data"].items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()

    def grace(name):
        return find(objects, "Deployment", name)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    assert grace("gpu-worker") >= settings.job_timeout + 60
    assert grace("webhooks") > settings.webhook_attempt_deadline
    assert grace("ingest") >= settings.ingest_stall_after
    gunicorn_conf = (REPO / "ops" / "gunicorn.conf.py").read_text()
    gunicorn_grace = int(re.search(r"^graceful_timeout = (\d+)", gunicorn_conf, re.M).group(1))
    pre_stop = main_container(find(objects, "Deployment", "api"))["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and grace("api") > gunicorn_grace + int(pre_stop[1])


def _selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_references_match(overlay):
    objects = list(rendered(overlay))
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    for obj in workloads:
        assert _selects(obj["spec"]["selector"]["matchLabels"], obj["spec"]["template"]["metadata"]["labels"])
    for obj in objects:
        if obj["kind"] in ("PodDisruptionBudget", "Service"):
            selector = obj["spec"]["selector"]
            selector = selector["matchLabels"] if obj["kind"] == "PodDisruptionBudget" else selector
            chosen = [w for w in workloads if _selects(selector, w["spec"]["template"]["metadata"]["labels"])]
            assert len(chosen) == 1, f"{obj['kind']}/{obj['metadata']['name']}: {len(chosen)} workloads"
            if obj["kind"] == "Service":
                ports = {p["name"] for _, c in containers(chosen) for p in c.get("ports", [])}
                assert {p["targetPort"] for p in obj["spec"]["ports"]} <= ports
    services = {o["metadata"]["name"]: {p["name"] for p in o["spec"]["ports"]}
                for o in objects if o["kind"] == "Service"}
    for obj in objects:
        if obj["kind"] == "Ingress":
            for rule in obj["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    assert backend["port"]["name"] in services[backend["name"]]
                    assert path["path"] != "/metrics" and not "/metrics".startswith(path["path"]), \
                        "the Ingress must not publish /metrics"
    autoscaled = [o["spec"]["scaleTargetRef"]["name"] for o in objects
                  if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert len(autoscaled) == len(set(autoscaled)), autoscaled
    for name in autoscaled:  # an applied replica count would fight the autoscaler
        assert "replicas" not in find(objects, "Deployment", name)["spec"], name
    auths = {o["metadata"]["name"] for o in objects if o["kind"] == "TriggerAuthentication"}
    for obj in objects:
        if obj["kind"] == "ScaledObject":
            assert {t["authenticationRef"]["name"] for t in obj["spec"]["triggers"]} <= auths


def test_gpu_overlay_gives_each_worker_one_gpu_and_the_gpu_image():
    objects = list(rendered("gpu"))
    worker_pod = find(objects, "Deployment", "gpu-worker")["spec"]["template"]["spec"]
    worker = worker_pod["containers"][0]
    resources = worker["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert gpu_taint in worker_pod["tolerations"]
    assert worker["image"] == "switchyard:gpu"
    assert {c["image"] for _, c in containers(objects) if c is not worker} == {"switchyard:cpu"}


@pytest.mark.parametrize("overlay", ["cpu", "dev"])
def test_cpu_overlays_ask_for_no_gpu(overlay):
    objects = rendered(overlay)
    assert "nvidia.com/gpu" not in json.dumps(objects)
    assert main_container(find(list(objects), "Deployment", "gpu-worker"))["image"] == "switchyard:cpu"


def test_keda_scales_ingest_on_its_queue_and_gpu_workers_on_unfinished_jobs(backing):
    objects = list(rendered("gpu"))
    queues = {WEBHOOKS_QUEUE, INGEST_QUEUE} | {route_queue(s) for s in STRATEGIES}
    consumers = {"workers.ingest_worker": INGEST_QUEUE, "workers.webhook_worker": WEBHOOKS_QUEUE}
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o["spec"] for o in objects if o["kind"] == "ScaledObject"}
    assert set(scaled) == {"gpu-worker", "ingest"}
    for name, spec in scaled.items():
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            if trigger["type"] == "redis" and name == "gpu-worker":  # the fair queue's backlog of the model served
                assert meta["listName"] == fair_queue.backlog_key(Settings().model_name)
                assert meta["listLength"].isdigit() and meta["activationListLength"].isdigit()
            elif trigger["type"] == "redis":
                assert meta["listName"] in queues
                module = main_container(find(objects, "Deployment", name))["command"][2]
                assert consumers[module] == meta["listName"], f"{name} does not consume {meta['listName']}"
                assert meta["listLength"].isdigit() and meta["activationListLength"].isdigit()
            else:
                assert trigger["type"] == "postgresql"
                statuses = re.search(r"status IN \(([^)]*)\)", meta["query"]).group(1)
                assert sorted(re.findall(r"'(\w+)'", statuses)) == ACTIVE_VALUES
                assert meta["targetQueryValue"].isdigit()
                with psycopg.connect(backing[0].url) as conn:  # the query runs on the migrated schema
                    [(count,)] = conn.execute(meta["query"]).fetchall()
                assert isinstance(count, int)
    assert [t["type"] for t in scaled["gpu-worker"]["triggers"]] == ["postgresql", "redis"]
    # /readyz needs a live worker: with none, every API pod would leave the Service
    assert scaled["gpu-worker"]["minReplicaCount"] >= 1


def test_dev_overlay_runs_redis_and_postgres_as_docker_compose_does():
    objects = list(rendered("dev"))
    redis = main_container(find(objects, "StatefulSet", "redis"))
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert "REDIS_PASSWORD" in _env_names(redis)
    postgres = main_container(find(objects, "StatefulSet", "postgres"))
    assert postgres["image"].startswith("pgvector/pgvector:")
    for name, port in (("redis", 6379), ("postgres", 5432)):
        service = find(objects, "Service", name)
        assert [p["port"] for p in service["spec"]["ports"]] == [port]
        assert f"@{name}:{port}/" in (REPO / "docs" / "kubernetes.md").read_text()
