"""Every Celery task name and queue name, in one place.

Queues: `route.<strategy>` (one per routing strategy, consumed by routers), `node.<node id>` (one per GPU
worker, consumed by that worker only), `webhooks` (consumed by webhook workers) and `ingest` (consumed by
ingest workers: parsing and embedding uploaded documents, never on a GPU worker).
"""

from __future__ import annotations

ROUTE_TASK = "switchyard.route"
GENERATE_TASK = "switchyard.generate"
DELIVER_TASK = "switchyard.deliver_webhook"
INGEST_TASK = "switchyard.ingest"

WEBHOOKS_QUEUE = "webhooks"
INGEST_QUEUE = "ingest"


def route_queue(strategy: str) -> str:
    return f"route.{strategy}"


def node_queue(node_id: str) -> str:
    return f"node.{node_id}"
