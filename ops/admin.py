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
    tenant.add_argument("--admin", action="store_true",
                        help="the key may read every tenant's dead letters and drain nodes")
    replay = sub.add_parser("replay-dead-letters", help="re-submit dead jobs (every open dead letter by default)")
    replay.add_argument("--reason", help="only dead letters with this reason (e.g. worker_lost, engine_dead)")
    replay.add_argument("--limit", type=int, default=1000)
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    if not settings.database_url:
        parser.error("DATABASE_URL is not set")
    if args.command == "migrate":
        migrate(settings.database_url)
    elif args.command == "replay-dead-letters":
        _replay(settings.require_urls(), args.reason, args.limit)
    else:
        with make_pool(settings.database_url, max_size=1) as pool:
            t, key = store.create_tenant(pool, args.name, admin=args.admin)
        print(f"tenant {t.name} ({t.id})\napi key: {key}")


def _replay(settings: Settings, reason: str | None, limit: int) -> None:
    from tasks.celery_app import create_celery
    from tasks.router import publish

    app = create_celery(settings)
    letters = [d for d in store.list_dead_letters(app.db, None, limit=limit) if reason in (None, d["reason"])]
    for n, letter in enumerate(letters, 1):
        job = store.replay_dead_letter(app.db, letter["id"])
        if job is not None:
            publish(app, job)
            print(f"[{n}/{len(letters)}] job {job['id']} re-queued as attempt {job['attempt']}")
    print(f"replayed {len(letters)} dead letter(s)")


if __name__ == "__main__":
    main()
