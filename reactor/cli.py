"""The `reactor` command: web | migrate | dev. Loads Settings once; a bad configuration exits with status 2."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from reactor.settings import Settings, SettingsError, load_settings

log = logging.getLogger("reactor.cli")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)


def run_web(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    from reactor.app import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        lifespan="on",
        proxy_headers=True,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=20,
    )
    uvicorn.Server(config).run()


async def _migrate(settings: Settings) -> None:
    import asyncpg

    from reactor.db import migrate

    conn = await asyncpg.connect(settings.postgres_dsn, timeout=10)
    try:
        await migrate(conn)
    finally:
        await conn.close()


def run_migrate(settings: Settings) -> None:
    asyncio.run(_migrate(settings))
    log.info("migrate.done")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reactor", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    web = commands.add_parser("web", help="serve the HTTP API (uvicorn)")
    web.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))  # noqa: S104 - a server binds all
    web.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8000))
    commands.add_parser("migrate", help="apply schema.sql (idempotent)")
    dev = commands.add_parser("dev", help="run everything locally: databases, migrations, web")
    dev.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8000))
    args = parser.parse_args(argv)

    if args.command == "dev":
        from reactor import dev as dev_mode

        _configure_logging("INFO")
        return dev_mode.run(port=args.port)

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"reactor: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    if args.command == "web":
        run_web(settings, args.host, args.port)
    elif args.command == "migrate":
        run_migrate(settings)
    return 0
