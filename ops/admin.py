"""Operator commands: `python -m ops.admin migrate` and `python -m ops.admin create-tenant NAME`."""

from __future__ import annotations

import argparse

from tasks import store
from tasks.db import make_pool, migrate
from tasks.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.admin")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply pending database migrations")
    tenant = sub.add_parser("create-tenant", help="create a tenant and print its API key (shown once)")
    tenant.add_argument("name")
    tenant.add_argument("--admin", action="store_true", help="the key may read every tenant's dead letters")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    if not settings.database_url:
        parser.error("DATABASE_URL is not set")
    if args.command == "migrate":
        migrate(settings.database_url)
    else:
        with make_pool(settings.database_url, max_size=1) as pool:
            t, key = store.create_tenant(pool, args.name, admin=args.admin)
        print(f"tenant {t.name} ({t.id})\napi key: {key}")


if __name__ == "__main__":
    main()
