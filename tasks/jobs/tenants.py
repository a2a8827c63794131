"""Tenants and their API keys. Keys are stored as their SHA-256 digest; the clear key is shown once."""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass, field

from psycopg_pool import ConnectionPool


def hash_api_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


#: the limits an operator may set per tenant (the rest of the tenant's limits are the defaults)
LIMIT_NAMES = ("submit_rate", "submit_burst", "max_attempts", "max_waits")


@dataclass(frozen=True)
class Tenant:
    id: uuid.UUID
    name: str
    default_strategy: str | None
    is_admin: bool = False
    limits: dict = field(default_factory=dict)  # overrides of settings' tenant defaults, by LIMIT_NAMES


# --- tenants and keys ---------------------------------------------------------------------------


def create_tenant(pool: ConnectionPool, name: str, *, admin: bool = False) -> tuple[Tenant, str]:
    """Create a tenant and its first API key; the clear key is returned once and never stored."""
    key = "sy_" + secrets.token_urlsafe(32)
    tenant_id = uuid.uuid4()
    with pool.connection() as conn, conn.transaction():
        conn.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (tenant_id, name))
        conn.execute(
            "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, is_admin) VALUES (%s, %s, %s, %s, %s)",
            (uuid.uuid4(), tenant_id, hash_api_key(key), key[:10], admin),
        )
    return Tenant(tenant_id, name, None, admin), key


def tenant_for_key(pool: ConnectionPool, key: str) -> Tenant | None:
    with pool.connection() as conn:
        row = conn.execute(
            """SELECT t.id, t.name, t.default_strategy, k.is_admin, t.limits
                 FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
                WHERE k.key_hash = %s AND k.revoked_at IS NULL""",
            (hash_api_key(key),),
        ).fetchone()
    return Tenant(row["id"], row["name"], row["default_strategy"], row["is_admin"], row["limits"]) if row else None


def set_limits(pool: ConnectionPool, name: str, limits: dict) -> dict:
    """Set (a number) or clear (None) some of a tenant's limits; returns its limits as they now are.
    Raises LookupError for an unknown tenant, ValueError for an unknown limit."""
    unknown = set(limits) - set(LIMIT_NAMES)
    if unknown:
        raise ValueError(f"unknown limit(s) {sorted(unknown)}; use {', '.join(LIMIT_NAMES)}")
    with pool.connection() as conn:
        row = conn.execute(
            """UPDATE tenants SET limits = jsonb_strip_nulls(limits || %s::jsonb) WHERE name = %s RETURNING limits""",
            (json.dumps(limits), name)).fetchone()
    if row is None:
        raise LookupError(f"no tenant named {name!r}")
    return row["limits"]

