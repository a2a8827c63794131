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
LIMIT_NAMES = ("submit_rate", "submit_burst", "output_tokens_per_minute", "max_attempts", "max_waits",
               "replays_per_day", "max_active_jobs", "max_queued_prompt_tokens", "share_weight")
#: the limits that may be fractional (the others are whole numbers)
FRACTIONAL_LIMITS = ("submit_rate", "share_weight")


#: what a key may do: read jobs (and collections, dead letters, nodes), submit and cancel them, manage
#: webhooks, and the operator's powers (every tenant's dead letters, draining nodes, keys, limits)
SCOPES = ("jobs:read", "jobs:write", "webhooks", "admin")
DEFAULT_SCOPES = ("jobs:read", "jobs:write", "webhooks")
_KEY_COLUMNS = "id, tenant_id, prefix, name, scopes, created_at, expires_at, revoked_at"


@dataclass(frozen=True)
class Tenant:
    id: uuid.UUID
    name: str
    default_strategy: str | None
    scopes: frozenset = frozenset(DEFAULT_SCOPES)  # of the key that authenticated
    limits: dict = field(default_factory=dict)  # overrides of settings' tenant defaults, by LIMIT_NAMES
    key_prefix: str = ""  # of that key: names the actor in the audit log

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


# --- tenants and keys ---------------------------------------------------------------------------


def _check_scopes(scopes) -> list[str]:
    scopes = list(dict.fromkeys(scopes))
    unknown = set(scopes) - set(SCOPES)
    if unknown or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {sorted(unknown) or 'none'}")
    return scopes


def _insert_key(conn, tenant_id, scopes, name: str | None, expires_in: float | None) -> tuple[dict, str]:
    key = "sy_" + secrets.token_urlsafe(32)
    row = conn.execute(
        f"""INSERT INTO api_keys (id, tenant_id, key_hash, prefix, is_admin, name, scopes, expires_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s::float8))
            RETURNING {_KEY_COLUMNS}""",
        (uuid.uuid4(), tenant_id, hash_api_key(key), key[:10], "admin" in scopes, name, list(scopes), expires_in),
    ).fetchone()
    return row, key


def create_tenant(pool: ConnectionPool, name: str, *, admin: bool = False) -> tuple[Tenant, str]:
    """Create a tenant and its first API key; the clear key is returned once and never stored."""
    tenant_id = uuid.uuid4()
    scopes = [*DEFAULT_SCOPES, *(["admin"] if admin else [])]
    with pool.connection() as conn, conn.transaction():
        conn.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (tenant_id, name))
        _, key = _insert_key(conn, tenant_id, scopes, "first key", None)
        audit(conn, "cli", "tenant.created", tenant_id, name, {"scopes": scopes})
    return Tenant(tenant_id, name, None, frozenset(scopes)), key


def tenant_for_key(pool: ConnectionPool, key: str) -> Tenant | None:
    """The tenant of a live key (not revoked, not expired), with that key's scopes; None otherwise."""
    with pool.connection() as conn:
        row = conn.execute(
            """SELECT t.id, t.name, t.default_strategy, k.scopes, t.limits, k.prefix
                 FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
                WHERE k.key_hash = %s AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())""",
            (hash_api_key(key),),
        ).fetchone()
    if row is None:
        return None
    return Tenant(row["id"], row["name"], row["default_strategy"], frozenset(row["scopes"]), row["limits"],
                  row["prefix"])


def _tenant_id(conn, name: str):
    row = conn.execute("SELECT id FROM tenants WHERE name = %s", (name,)).fetchone()
    if row is None:
        raise LookupError(f"no tenant named {name!r}")
    return row["id"]


def create_key(pool: ConnectionPool, tenant_name: str, *, scopes=DEFAULT_SCOPES, name: str | None = None,
               expires_in: float | None = None, actor: str = "cli") -> tuple[dict, str]:
    """A new key for the tenant (it may have several): (its record, the clear key, shown once)."""
    scopes = _check_scopes(scopes)
    with pool.connection() as conn, conn.transaction():
        tenant_id = _tenant_id(conn, tenant_name)
        row, key = _insert_key(conn, tenant_id, scopes, name, expires_in)
        audit(conn, actor, "key.created", tenant_id, row["prefix"], {"scopes": scopes, "name": name,
                                                                      "expires_at": _iso(row["expires_at"])})
    return row, key


def list_keys(pool: ConnectionPool, tenant_name: str) -> list[dict]:
    with pool.connection() as conn:
        tenant_id = _tenant_id(conn, tenant_name)
        return conn.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE tenant_id = %s ORDER BY created_at",
                            (tenant_id,)).fetchall()


def _find_key(conn, ref: str) -> dict:
    """A key by its id or by its prefix (the first 10 characters, which `list-keys` shows)."""
    try:
        where, value = "id = %s", uuid.UUID(ref)
    except ValueError:
        where, value = "prefix = %s", ref
    rows = conn.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE {where}", (value,)).fetchall()
    if len(rows) != 1:
        raise LookupError(f"no key {ref!r}" if not rows else f"prefix {ref!r} matches {len(rows)} keys; use its id")
    return rows[0]


def revoke_key(pool: ConnectionPool, ref: str, *, actor: str = "cli") -> dict:
    """Revoke a key now (every API refuses it within a second: they remember a key for one)."""
    with pool.connection() as conn, conn.transaction():
        key = _find_key(conn, ref)
        row = conn.execute(f"""UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s
                               RETURNING {_KEY_COLUMNS}""", (key["id"],)).fetchone()
        audit(conn, actor, "key.revoked", key["tenant_id"], key["prefix"], {})
    return row


def rotate_key(pool: ConnectionPool, ref: str, *, overlap: float = 0.0, actor: str = "cli") -> tuple[dict, str]:
    """A new key with the old one's name and scopes; the old one expires after `overlap` seconds (so
    clients can switch over), or at once."""
    with pool.connection() as conn, conn.transaction():
        old = _find_key(conn, ref)
        if old["revoked_at"] is not None:
            raise ValueError(f"key {old['prefix']} is revoked; create a new one instead")
        row, key = _insert_key(conn, old["tenant_id"], old["scopes"], old["name"], None)
        conn.execute("""UPDATE api_keys SET expires_at = least(coalesce(expires_at, 'infinity'),
                                                               now() + make_interval(secs => %s))
                         WHERE id = %s""", (overlap, old["id"]))
        audit(conn, actor, "key.rotated", old["tenant_id"], old["prefix"], {"new": row["prefix"], "overlap_s": overlap})
    return row, key


def audit(conn, actor: str, action: str, tenant_id, target: str | None, details: dict) -> None:
    """One line of the audit log, in the caller's transaction."""
    conn.execute("INSERT INTO audit_log (actor, tenant_id, action, target, details) VALUES (%s, %s, %s, %s, %s)",
                 (actor, tenant_id, action, target, json.dumps(details)))


def share_weights(pool: ConnectionPool, tenant_ids: list) -> dict[str, float]:
    """{tenant id: its share_weight} for those of `tenant_ids` that set one (the rest use the default)."""
    with pool.connection() as conn:
        rows = conn.execute("""SELECT id::text, (limits->>'share_weight')::float8 AS weight FROM tenants
                                WHERE id = ANY(%s::uuid[]) AND limits ? 'share_weight'""", (tenant_ids,)).fetchall()
    return {r["id"]: r["weight"] for r in rows}


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def set_limits(pool: ConnectionPool, name: str, limits: dict, *, actor: str = "cli") -> dict:
    """Set (a number) or clear (None) some of a tenant's limits; returns its limits as they now are.
    Raises LookupError for an unknown tenant, ValueError for an unknown limit."""
    unknown = set(limits) - set(LIMIT_NAMES)
    if unknown:
        raise ValueError(f"unknown limit(s) {sorted(unknown)}; use {', '.join(LIMIT_NAMES)}")
    with pool.connection() as conn, conn.transaction():
        row = conn.execute(
            """UPDATE tenants SET limits = jsonb_strip_nulls(limits || %s::jsonb) WHERE name = %s
               RETURNING id, limits""", (json.dumps(limits), name)).fetchone()
        if row is None:
            raise LookupError(f"no tenant named {name!r}")
        audit(conn, actor, "limits.set", row["id"], name, limits)
    return row["limits"]

