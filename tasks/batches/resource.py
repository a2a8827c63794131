"""How files and batches are shown to clients, in OpenAI's shapes (the File and Batch objects), and
their public ids: `file-<hex>`, `batch_<hex>`, and `batch_req_<hex>` for a line's result (the hex is the
row's uuid; the job's, for a line)."""

from __future__ import annotations

import uuid
from datetime import datetime

FILE_PREFIX, BATCH_PREFIX, REQUEST_PREFIX = "file-", "batch_", "batch_req_"
#: the states in which a batch's lines may still run
OPEN = ("validating", "in_progress", "finalizing", "cancelling")
#: the states a batch ends in (each sends its `batch.<status>` webhook)
ENDED = ("completed", "failed", "expired", "cancelled")
#: the completion windows a batch may ask for (OpenAI's only one)
WINDOWS = ("24h",)


def file_id(value) -> str:
    return FILE_PREFIX + uuid.UUID(str(value)).hex


def batch_id(value) -> str:
    return BATCH_PREFIX + uuid.UUID(str(value)).hex


def request_id(value) -> str:
    return REQUEST_PREFIX + uuid.UUID(str(value)).hex


def parse_id(public: str, prefix: str) -> uuid.UUID | None:
    """The row id a public id names; None when it is not one of ours (the caller answers 404)."""
    if not public.startswith(prefix):
        return None
    try:
        return uuid.UUID(hex=public.removeprefix(prefix))
    except ValueError:
        return None


def _unix(value) -> int | None:
    """A timestamp as Unix seconds; a webhook's snapshot (to_jsonb) holds it as ISO text."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return int(value.timestamp())


def file_resource(row: dict) -> dict:
    return {"id": file_id(row["id"]), "object": "file", "bytes": row["bytes"], "created_at": _unix(row["created_at"]),
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None,
            "expires_at": None}


def counts_of(row: dict) -> dict:
    """The request counts an ended batch stored."""
    return {"total": row["request_total"], "completed": row["request_completed"], "failed": row["request_failed"]}


def batch_resource(row: dict, counts: dict | None = None) -> dict:
    """A batch row (or its webhook snapshot) as OpenAI's Batch object; `counts`: the live request counts of
    an open batch (an ended one has its own)."""
    def maybe_file(value):
        return file_id(value) if value else None

    return {
        "id": batch_id(row["id"]),
        "object": "batch",
        "endpoint": row["endpoint"],
        "errors": {"object": "list", "data": row["errors"]} if row["errors"] else None,
        "input_file_id": file_id(row["input_file_id"]),
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": maybe_file(row["output_file_id"]),
        "error_file_id": maybe_file(row["error_file_id"]),
        **{name: _unix(row[name]) for name in ("created_at", "in_progress_at", "expires_at", "finalizing_at",
                                               "completed_at", "failed_at", "expired_at", "cancelling_at",
                                               "cancelled_at")},
        "request_counts": counts if counts is not None and row["status"] in OPEN else counts_of(row),
        "usage": row["usage"],
        "metadata": row["metadata"],
    }
