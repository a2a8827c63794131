"""Bearer API keys → tenant. Keys are looked up by their SHA-256 digest.

A key found valid is remembered in the process for KEY_CACHE_SECONDS, so a client's stream of requests
does not cost a Postgres query each; a revoked or expired key is refused within that time on every API
process. Each key carries scopes (tasks/jobs/tenants.py); a request needs the one `required_scope` names.
"""

from __future__ import annotations

import time

from flask import current_app, g, request

from api.errors import ApiError
from tasks.jobs import tenants


def authenticate() -> None:
    """Blueprint `before_request` hook: sets `g.tenant` or answers 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "Unauthorized", "send your API key as `Authorization: Bearer <key>`",
                       headers={"WWW-Authenticate": 'Bearer realm="switchyard"'})
    tenant = _tenant(key.strip())
    if tenant is None:
        raise ApiError(401, "Unauthorized", "the API key is not valid (unknown or revoked)",
                       headers={"WWW-Authenticate": 'Bearer realm="switchyard", error="invalid_token"'})
    scope = required_scope()
    if scope not in tenant.scopes:
        raise ApiError(403, "Forbidden", f"this API key lacks the `{scope}` scope (it has: "
                       f"{', '.join(sorted(tenant.scopes))}); use a key with it (`python -m ops.admin create-key`)")
    g.tenant = tenant


def required_scope() -> str:
    """The scope a request needs: `webhooks` for the webhooks endpoints, `admin` to drain nodes, else
    `jobs:read` to read and `jobs:write` to submit, cancel, replay or change collections."""
    if request.blueprint == "webhooks":
        return "webhooks"
    if request.blueprint == "admin" or (request.blueprint == "nodes" and request.method != "GET"):
        return "admin"
    return "jobs:read" if request.method in ("GET", "HEAD") else "jobs:write"


KEY_CACHE_SECONDS = 1.0
_KEY_CACHE_LIMIT = 10_000
_known: dict[str, tuple[tenants.Tenant, float]] = {}  # key → (tenant, until); valid keys only


def _tenant(key: str) -> tenants.Tenant | None:
    now = time.monotonic()
    cached = _known.get(key)
    if cached is not None and cached[1] > now:
        return cached[0]
    tenant = tenants.tenant_for_key(current_app.extensions["switchyard"].pool, key)
    if tenant is not None:
        if len(_known) >= _KEY_CACHE_LIMIT:
            _known.clear()
        _known[key] = (tenant, now + KEY_CACHE_SECONDS)
    else:
        _known.pop(key, None)
    return tenant
