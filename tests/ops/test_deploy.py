"""The webhooks worker is deployed on its own (docker-compose) and never consumes a GPU worker's queue."""

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
