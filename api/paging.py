"""Query parameters shared by the list endpoints: `limit`, and `cursor` pagination over
(created_at, id), newest first."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime

from flask import jsonify, request

from api.errors import ApiError


def limit_arg(default: int = 20, maximum: int = 100) -> int:
    raw = request.args.get("limit", str(default))
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= maximum:
        raise ApiError(400, "Invalid limit", f"`limit` must be an integer between 1 and {maximum}, got {raw!r}")
    return limit


def status_arg(allowed) -> str | None:
    status = request.args.get("status")
    if status is not None and status not in allowed:
        raise ApiError(400, "Invalid status", f"`status` must be one of {', '.join(allowed)}")
    return status


def cursor_arg() -> tuple[datetime, uuid.UUID] | None:
    """The (created_at, id) the previous page ended at, from `?cursor=`."""
    cursor = request.args.get("cursor")
    if cursor is None:
        return None
    try:
        ts, row_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(ts), uuid.UUID(row_id)
    except Exception:  # noqa: BLE001 - any garbage is the same client error
        raise ApiError(400, "Invalid cursor", "`cursor` must be the `next_cursor` of a previous page") from None


def page_response(rows: list[dict], limit: int, resource):
    """`rows` fetched with limit + 1: the page, and a `next_cursor` when there is more."""
    page, more = rows[:limit], len(rows) > limit
    cursor = None
    if more:
        last = page[-1]
        cursor = base64.urlsafe_b64encode(json.dumps([last["created_at"].isoformat(), str(last["id"])]).encode())
    return jsonify(object="list", data=[resource(r) for r in page], next_cursor=cursor.decode() if cursor else None)
