"""The webhooks and ingest workers are deployed on their own (docker-compose, `make up`) and never consume a
GPU worker's queue."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_runs_a_webhooks_worker_on_the_cpu_image():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    webhooks = services["webhooks"]
    assert webhooks["command"] == ["python", "-m", "workers.webhook_worker"]
    assert webhooks["image"] == "switchyard:cpu" and "deploy" not in webhooks
    assert "SWITCHYARD_WEBHOOK_ALLOW" not in webhooks["environment"]  # production: deny internal addresses
    assert "webhooks" not in " ".join(services["worker"]["command"])


def test_compose_runs_an_ingest_worker_on_the_cpu_image():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    ingest = services["ingest"]
    assert ingest["command"] == ["python", "-m", "workers.ingest_worker"]
    assert ingest["image"] == "switchyard:cpu" and "deploy" not in ingest
    assert ingest["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_make_up_starts_the_ingest_worker():
    from ops.cluster import APP, processes

    assert "ingest" in APP
    assert processes({})["ingest"][1:] == ["-m", "workers.ingest_worker"]
