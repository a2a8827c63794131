"""Operator commands: `python -m ops.admin migrate`, `create-tenant NAME`, `create-key NAME`,
`list-keys NAME`, `revoke-key KEY`, `rotate-key KEY`, `set-limits NAME` and `replay-dead-letters`.
Every change to keys and limits is written to the audit log (table audit_log).

They use DATABASE_URL / REDIS_URL when set; otherwise the URLs of the local cluster that `make up`
started (kept in .switchyard/env), so they work right after `make up` with nothing exported.
"""

from __future__ import annotations

import argparse
import math

from tasks.db import make_pool, migrate
from tasks.jobs import dead_letters, lifecycle, tenants
from tasks.settings import Settings


def settings_with_local_urls() -> Settings:
    """Settings from the environment, with the local cluster's URLs filling in any that are unset."""
    settings = Settings.from_env()
    if settings.database_url and settings.redis_url:
        return settings
    from ops.cluster import local_urls

    urls = local_urls(settings)
    return settings.model_copy(update={"database_url": settings.database_url or urls.get("DATABASE_URL"),
                                       "redis_url": settings.redis_url or urls.get("REDIS_URL")})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.admin", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply pending database migrations")
    role = sub.add_parser("app-role", help="make the least-privileged Postgres role the services connect as "
                                           "(run as the owner, after migrate); password from SWITCHYARD_APP_DB_PASSWORD")
    role.add_argument("role")
    sub.add_parser("new-secrets-key", help="print a new key for SWITCHYARD_SECRETS_KEY (seals webhook secrets)")
    sub.add_parser("seal-secrets", help="seal the webhook secrets stored before SWITCHYARD_SECRETS_KEY was set")
    tenant = sub.add_parser("create-tenant", help="create a tenant and print its API key (shown once)")
    tenant.add_argument("name")
    tenant.add_argument("--admin", action="store_true",
                        help="the key may read every tenant's dead letters and drain nodes")
    key = sub.add_parser("create-key", help="another API key for a tenant (prints it once)")
    key.add_argument("name", help="the tenant")
    key.add_argument("--scopes", default=",".join(tenants.DEFAULT_SCOPES),
                     help=f"comma-separated, of {', '.join(tenants.SCOPES)} (default: %(default)s)")
    key.add_argument("--label", help="a name for the key, e.g. the service that uses it")
    key.add_argument("--expires-in-days", type=float, help="the key stops working after this many days")
    sub.add_parser("list-keys", help="a tenant's keys (prefix, name, scopes, expiry, revoked)").add_argument("name")
    sub.add_parser("revoke-key", help="revoke a key now (by id or prefix)").add_argument("key")
    rotate = sub.add_parser("rotate-key", help="a new key with the same scopes; the old one expires after --overlap")
    rotate.add_argument("key", help="the key's id or prefix")
    rotate.add_argument("--overlap", type=float, default=3600.0, help="seconds the old key keeps working (default 3600)")
    limits = sub.add_parser("set-limits", help="set (or, with `default`, clear) a tenant's limits; prints them")
    limits.add_argument("name")
    limits.add_argument("--submit-rate", help="jobs per second after the burst (default SWITCHYARD_TENANT_SUBMIT_RATE)")
    limits.add_argument("--submit-burst", help="jobs at once (default SWITCHYARD_TENANT_SUBMIT_BURST)")
    limits.add_argument("--output-tokens-per-minute",
                        help="the jobs' max_tokens per minute (default SWITCHYARD_TENANT_OUTPUT_TOKENS_PER_MINUTE)")
    limits.add_argument("--replays-per-day", help="dead-letter replays per UTC day (default "
                                                  "SWITCHYARD_TENANT_REPLAYS_PER_DAY)")
    limits.add_argument("--max-active-jobs", help="jobs not finished at once (default SWITCHYARD_TENANT_MAX_ACTIVE_JOBS)")
    limits.add_argument("--max-queued-prompt-tokens",
                        help="the prompt tokens unfinished jobs hold (default SWITCHYARD_TENANT_MAX_QUEUED_PROMPT_TOKENS)")
    limits.add_argument("--max-attempts", help="the most attempts a job may ask for (default 20)")
    limits.add_argument("--max-waits", help="concurrent long-polls (default SWITCHYARD_MAX_WAITS_PER_TENANT)")
    limits.add_argument("--share-weight", help="the tenant's weight in fair dispatch: 2 gets twice the fleet of 1 "
                        "when both have work waiting (default SWITCHYARD_TENANT_SHARE_WEIGHT)")
    replay = sub.add_parser("replay-dead-letters", help="re-submit dead jobs (every open dead letter by default)")
    replay.add_argument("--reason", help="only dead letters with this reason (e.g. worker_lost, engine_dead)")
    replay.add_argument("--limit", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.command == "new-secrets-key":
        from tasks.webhooks.sealing import new_key

        print(new_key())
        return

    settings = settings_with_local_urls()
    if not settings.database_url:
        parser.error("DATABASE_URL is not set and no local cluster was found: export DATABASE_URL (and "
                     "REDIS_URL), or start the local cluster with `make up`")
    if args.command == "migrate":
        migrate(settings.database_url)
    elif args.command == "app-role":
        from tasks.db import grant_app_role

        grant_app_role(settings.database_url, args.role, settings.app_db_password)
        print(f"role {args.role}: rows of every table, no DDL; owns chunks (collection indexes)")
    elif args.command == "seal-secrets":
        from tasks.webhooks.sealing import SecretBox
        from tasks.webhooks.store import seal_stored_secrets

        if not settings.secrets_key:
            parser.error("SWITCHYARD_SECRETS_KEY is not set (make one with `python -m ops.admin new-secrets-key`)")
        with make_pool(settings.database_url, max_size=1) as pool:
            print(f"sealed {seal_stored_secrets(pool, SecretBox(settings.secrets_key))} webhook secret(s)")
    elif args.command == "replay-dead-letters":
        _replay(settings.require_urls(), args.reason, args.limit)
    elif args.command in ("create-key", "list-keys", "revoke-key", "rotate-key"):
        try:
            with make_pool(settings.database_url, max_size=1) as pool:
                _keys(pool, args)
        except (LookupError, ValueError) as exc:
            parser.error(str(exc))
    elif args.command == "set-limits":
        given = {name: getattr(args, name) for name in tenants.LIMIT_NAMES if getattr(args, name) is not None}
        if not given:
            parser.error("give at least one limit, e.g. --submit-rate 50 (or `default` to clear one)")
        try:
            changes = {name: None if value == "default" else _positive(name, value) for name, value in given.items()}
            with make_pool(settings.database_url, max_size=1) as pool:
                now = tenants.set_limits(pool, args.name, changes)
        except (LookupError, ValueError) as exc:
            parser.error(str(exc))
        print(f"tenant {args.name}: limits {now or '(all defaults)'} (in effect within a second on every API)")
    else:
        with make_pool(settings.database_url, max_size=1) as pool:
            t, key = tenants.create_tenant(pool, args.name, admin=args.admin)
        print(f"tenant {t.name} ({t.id})\napi key: {key}")


def _keys(pool, args) -> None:
    if args.command == "create-key":
        expires = args.expires_in_days * 86400 if args.expires_in_days else None
        row, key = tenants.create_key(pool, args.name, scopes=args.scopes.split(","), name=args.label,
                                      expires_in=expires)
        print(f"key {row['prefix']}… ({row['id']}) scopes {','.join(row['scopes'])}"
              f"{' expires ' + row['expires_at'].isoformat() if row['expires_at'] else ''}\napi key: {key}")
    elif args.command == "list-keys":
        for row in tenants.list_keys(pool, args.name):
            state = ("revoked " + row["revoked_at"].isoformat() if row["revoked_at"] else
                     "expires " + row["expires_at"].isoformat() if row["expires_at"] else "live")
            print(f"{row['prefix']}…  {row['id']}  {row['name'] or '-':<20} {','.join(row['scopes']):<35} {state}")
    elif args.command == "revoke-key":
        row = tenants.revoke_key(pool, args.key)
        print(f"key {row['prefix']}… revoked (refused by every API within a second)")
    else:
        row, key = tenants.rotate_key(pool, args.key, overlap=args.overlap)
        print(f"new key {row['prefix']}… ({row['id']}); the old one stops working in {args.overlap:g} s\napi key: {key}")


def _positive(name: str, value: str) -> float | int:
    number = float(value)
    fractional = name in tenants.FRACTIONAL_LIMITS
    if not math.isfinite(number) or number <= 0 or (not fractional and not number.is_integer()):
        raise ValueError(f"--{name.replace('_', '-')} must be a positive {'number' if fractional else 'whole number'}"
                         f" (or `default`), got {value!r}")
    return number if fractional else int(number)


def _replay(settings: Settings, reason: str | None, limit: int) -> None:
    from tasks.celery_app import create_celery

    app = create_celery(settings)
    letters = [d for d in dead_letters.list_dead_letters(app.db, None, limit=limit) if reason in (None, d["reason"])]
    for n, letter in enumerate(letters, 1):
        job = lifecycle.replay(app, letter["id"])
        if job is not None:
            print(f"[{n}/{len(letters)}] job {job['id']} re-queued as attempt {job['attempt']}")
    print(f"replayed {len(letters)} dead letter(s)")


if __name__ == "__main__":
    main()
