"""How a job row is shown to clients (GET /v1/jobs/{id}, lists, webhook payloads)."""

from __future__ import annotations

from datetime import datetime


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def job_resource(row: dict) -> dict:
    return {
        "id": str(row["id"]),
        "object": "job",
        "status": row["status"],
        "model": row["model"],
        "routing": {"strategy": row["routing_strategy"]},
        "attempt": row["attempt"],
        "node_id": row["node_id"],
        "created_at": _ts(row["created_at"]),
        "routed_at": _ts(row["routed_at"]),
        "started_at": _ts(row["started_at"]),
        "finished_at": _ts(row["finished_at"]),
        "request": row["request"],
        "metadata": row["metadata"],
        "webhook": row.get("webhook"),
        "result": row["result"],
        "error": row["error"],
    }
