"""Bearer API keys → tenant. Keys are looked up by their SHA-256 digest.

A key found valid is remembered in the process for KEY_CACHE_SECONDS, so a client's stream of requests
does not cost a Postgres query each; a revoked key is refused within that time on every API process.
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
    g.tenant = tenant


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
