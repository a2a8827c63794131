"""Every Celery task name and queue name, in one place.

Queues: `route.<strategy>` (one per routing strategy, consumed by routers), `node.<node id>` (one per GPU
worker, consumed by that worker only) and `webhooks` (consumed by webhook workers).
"""

from __future__ import annotations

ROUTE_TASK = "switchyard.route"
GENERATE_TASK = "switchyard.generate"
DELIVER_TASK = "switchyard.deliver_webhook"

WEBHOOKS_QUEUE = "webhooks"


def route_queue(strategy: str) -> str:
    return f"route.{strategy}"


def node_queue(node_id: str) -> str:
    return f"node.{node_id}"
