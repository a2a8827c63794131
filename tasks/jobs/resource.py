"""How a job row is shown to clients (GET /v1/jobs/{id}, lists, webhook payloads)."""

from __future__ import annotations

from datetime import datetime


def timestamp(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def job_resource(row: dict) -> dict:
    return {
        "id": str(row["id"]),
        "object": "job",
        "status": row["status"],
        "model": row["model"],
        "routing": {"strategy": row["routing_strategy"], "session_id": row["session_id"]},
        "priority": row["priority"],
        "attempt": row["attempt"],
        "max_attempts": row["max_attempts"],
        "node_id": row["node_id"],
        "created_at": timestamp(row["created_at"]),
        "routed_at": timestamp(row["routed_at"]),
        "started_at": timestamp(row["started_at"]),
        "retrieval_started_at": timestamp(row.get("retrieval_started_at")),
        "retrieved_at": timestamp(row.get("retrieved_at")),
        "finished_at": timestamp(row["finished_at"]),
        "cancel_at": timestamp(row.get("cancel_at")),
        "request": row["request"],
        "metadata": row["metadata"],
        "webhook": row.get("webhook"),
        "result": row["result"],
        "error": row["error"],
    }
