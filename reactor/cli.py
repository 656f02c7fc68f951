"""The `reactor` command line. Each command loads Settings once; a bad configuration, or a PostgreSQL, Redis or
Twenty that cannot be reached, is one line on stderr and exit status 2 (a traceback only with LOG_LEVEL=DEBUG)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from reactor.settings import Settings, SettingsError, load_settings

log = logging.getLogger("reactor.cli")


def _configure_logging(level: str, fmt: str = "text", pii: bool = False) -> None:
    from reactor import logs

    logs.configure(level, fmt=fmt, pii=pii)


def run_web(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    from reactor.app import create_app
    from reactor.server import SERVER_LIMITS

    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        lifespan="on",
        proxy_headers=True,
        loop="uvloop",  # the C event loop; the HTTP protocol is SERVER_LIMITS' (httptools with bounds on a head)
        access_log=False,  # a log line per request costs more than intake's own work; errors are logged anyway
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's loggers go through reactor's handler (JSON, request ids, masking)
        timeout_graceful_shutdown=20,
        **SERVER_LIMITS,
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


def _check_worker(settings: Settings) -> int:
    """arq's health check: every worker writes a sentinel with an expiry (health_check_interval) while it runs."""
    from arq.connections import RedisSettings
    from arq.worker import async_check_health

    healthy = asyncio.run(async_check_health(RedisSettings.from_dsn(settings.redis_url)))
    print("worker healthy" if healthy == 0 else "no healthy worker reported", file=sys.stderr)
    return healthy


def run_worker(settings: Settings) -> int:
    if not (settings.twenty_rest_url and settings.twenty_rest_token):
        print(
            "reactor: invalid configuration:\n  TWENTY_REST_URL, TWENTY_REST_TOKEN: required by the worker",
            file=sys.stderr,
        )
        return 2
    from reactor import worker

    return asyncio.run(worker.run(settings))


async def _replay(settings: Settings, job_name: str | None, failed_id: int | None) -> int:
    from reactor import deadletters
    from reactor.resources import open_resources

    async with open_resources(settings) as res:
        replayed = await deadletters.replay(res.db, res.redis, job_name=job_name, failed_id=failed_id)
    for item in replayed:
        state = "enqueued" if item.enqueued else "already queued"
        print(f"{item.failed_id}\t{item.job_name}\t{item.job_id or '-'}\t{state}")
    print(f"replayed {len(replayed)} dead letter(s)")
    return 0


def _require_twenty(settings: Settings, what: str) -> bool:
    if settings.twenty_rest_url and settings.twenty_rest_token:
        return True
    print(f"reactor: invalid configuration:\n  TWENTY_REST_URL, TWENTY_REST_TOKEN: required by {what}", file=sys.stderr)
    return False


async def _webhook(settings: Settings, action: str, url: str | None) -> int:
    from reactor import subscription
    from reactor.twenty import TwentyClient, TwentyError, TwentyUnavailable, create_http_client

    assert settings.twenty_rest_url
    assert settings.twenty_rest_token
    async with create_http_client(settings.twenty_rest_url, settings.twenty_rest_token.get_secret_value()) as http:
        twenty = TwentyClient(http)
        try:
            if action == "install":
                assert url is not None
                done = await subscription.install(twenty, url)
                print(
                    f"{'created' if done.created else 'updated'} webhook {done.webhook.id} -> {done.webhook.target_url}"
                )
                print(f"operations: {', '.join(done.webhook.operations)}")
                if done.secret:
                    print(f"\nPut this in reactor's environment:\n  TWENTY_WEBHOOK_SECRET={done.secret}")
                if subscription.is_private(url):
                    print(
                        "\nwarning: this address is private or loopback. A self-hosted Twenty refuses to call it"
                        " unless, on its server and worker, OUTBOUND_HTTP_ALLOWED_INTERNAL_HOSTS lists the host"
                        " (newer servers) or OUTBOUND_HTTP_SAFE_MODE_ENABLED=false (older ones, up to 1.16)."
                    )
                return 0
            hooks = await twenty.list_webhooks()
        except TwentyUnavailable:
            raise  # main's one line: Twenty's host and what to check, exit 2
        except TwentyError as exc:
            print(f"reactor: {exc}", file=sys.stderr)
            return 1
    configured = settings.twenty_webhook_secret.get_secret_value() if settings.twenty_webhook_secret else None
    if not hooks:
        print(
            "no webhook subscriptions in Twenty; run: reactor webhook install --url https://<reactor>/webhooks/twenty"
        )
    for hook in hooks:
        missing = subscription.covers(hook)
        match = subscription.secret_matches(hook, configured)
        secret = {True: "matches TWENTY_WEBHOOK_SECRET", False: "differs from TWENTY_WEBHOOK_SECRET",
                  None: "not comparable"}[match]  # fmt: skip
        print(f"{hook.id}  {hook.target_url}\n  operations: {', '.join(hook.operations)}"
              f"\n  missing for reactor: {', '.join(missing) or 'nothing'}\n  secret: {secret}")  # fmt: skip
    return 0


async def _reconcile(settings: Settings, *, dry_run: bool, check: bool, as_json: bool) -> int:
    import json
    import uuid

    from redis.exceptions import RedisError

    from reactor import reconcile
    from reactor.resources import open_resources
    from reactor.twenty import TwentyError, TwentyUnavailable

    async with open_resources(settings) as res:
        try:
            if check:
                try:
                    loads = await reconcile.check(res)
                except (TwentyError, RedisError, OSError) as exc:
                    # 2, not 1: nothing is known about drift. One line, for a cron mail or a probe's log.
                    where = "Twenty" if isinstance(exc, TwentyError) else "Redis"
                    reason = " ".join(str(exc).split()) or type(exc).__name__
                    print(f"reactor: reconcile --check: {where} could not be asked: {reason}", file=sys.stderr)
                    return 2
                drift = {m: d for m, d in loads.items() if d["cached"] != d["true"]}
                if as_json:
                    print(json.dumps({"loads": loads, "drift": drift}))
                else:
                    for member, d in loads.items():
                        mark = "  <- drift" if member in drift else ""
                        print(f"{member}: cached {d['cached']}, true {d['true']}{mark}")
                    print(f"{len(drift)} member(s) drifted" if drift else "no drift")
                return 1 if drift else 0
            run_id = f"cli:{uuid.uuid4().hex}"
            holder = await reconcile.acquire(res.redis, run_id)
            if holder is not None:
                print(f"reactor: reconcile {holder} is already running", file=sys.stderr)
                return 1
            try:
                report = await reconcile.run(res, run_id, dry_run=dry_run, progress=_progress_bar(as_json))
            finally:
                await reconcile.release(res.redis, run_id)
        except TwentyUnavailable:
            raise  # main's one line: Twenty's host and what to check, exit 2
        except TwentyError as exc:
            print(f"\nreactor: Twenty: {exc}", file=sys.stderr)
            return 1
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        print("\n".join(reconcile.summary_lines(report)))
    return 0


def _progress_bar(quiet: bool) -> Any:
    """Progress on stderr when it is a terminal: `loads 1200/10000`, rewritten in place."""
    if quiet or not sys.stderr.isatty():
        return None

    async def show(step: str, done: int, total: int | None) -> None:
        shown = f"{done}/{total}" if total else (str(done) if done else "")
        print(f"\r\033[Kreconcile: {step} {shown}", end="" if step != "done" else "\n", file=sys.stderr, flush=True)

    return show


def webhook_url_problem(url: str) -> str | None:
    """Why `url` cannot be reactor's webhook endpoint, or None: Twenty would POST every event there."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or " " in url.strip():
        return f"--url {url!r} is not an http(s) URL"
    if not parts.path.rstrip("/").endswith("/webhooks/twenty"):
        return f"--url {url!r} does not end in /webhooks/twenty, reactor's webhook endpoint"
    return None


def _load(argv_command: str) -> Settings:
    """Settings from the environment, then a running `reactor dev`'s .reactor/dev.env (unless the environment
    names a database), then .env."""
    from reactor import devstack

    overrides = devstack.dev_env_overrides(os.environ)
    if overrides:
        print(f"reactor {argv_command}: using the running reactor dev's settings ({devstack.DEV_ENV})", file=sys.stderr)
    return load_settings(Path(".env"), **overrides)


async def _reach_postgres(settings: Settings) -> None:
    import asyncpg

    conn = await asyncpg.connect(settings.postgres_dsn, timeout=10)
    await conn.close()


async def _doctor(settings: Settings, webhook_url: str | None) -> int:
    from reactor import doctor

    checks = await doctor.run(settings, webhook_url=webhook_url)
    print("\n".join(check.line() for check in checks))
    return doctor.exit_status(checks)


def _outage(exc: Exception) -> str | None:
    """The one line for a server that could not be reached (doctor.unreachable), with what Settings names."""
    from reactor import devstack, doctor

    try:
        settings = load_settings(Path(".env"), **devstack.dev_env_overrides(os.environ))
    except SettingsError:
        return None
    return doctor.unreachable(exc, postgres_dsn=settings.postgres_dsn, redis_url=settings.redis_url,
                              twenty_url=settings.twenty_rest_url)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reactor",
        description="reactor turns inbound leads into worked follow-ups in Twenty CRM.",
        epilog="`reactor dev` runs everything on this machine; `reactor doctor` says what is wrong and how to fix it.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    web = commands.add_parser("web", help="serve the HTTP API (uvicorn)")
    web.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))  # noqa: S104 - a server binds all
    web.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8000))
    worker = commands.add_parser("worker", help="run the arq worker (sync jobs, the backlog sweep)")
    worker.add_argument("--check", action="store_true", help="exit 0 if a worker reported itself healthy lately")
    commands.add_parser("migrate", help="apply schema.sql (idempotent)")
    replay = commands.add_parser("replay", help="re-enqueue jobs that failed for good (GET /jobs/failed)")
    replay.add_argument("--job", help="only dead letters of this job name, e.g. sync_lead")
    replay.add_argument("--id", type=int, help="only this dead letter (its id in GET /jobs/failed)")
    reconcile = commands.add_parser("reconcile", help="repair what events missed, and report the drift")
    reconcile.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")
    reconcile.add_argument("--check", action="store_true", help="compare loads only: exit 0 clean, 1 drift, 2 unknown")
    reconcile.add_argument("--json", action="store_true", help="print the summary as JSON")
    link = commands.add_parser("dashboard-link", help="print a sign-in link to the dashboard (GET /)")
    link.add_argument("--url", default="http://127.0.0.1:8000", help="where reactor's web process is reached")
    link.add_argument("--hours", type=float, default=12, help="how long the link works")
    link.add_argument("--source", help="the lead source whose key signs it (default: the first)")
    webhook = commands.add_parser("webhook", help="manage reactor's webhook subscription in Twenty")
    webhook_actions = webhook.add_subparsers(dest="action", required=True)
    install = webhook_actions.add_parser("install", help="create or update the subscription; prints the secret")
    install.add_argument("--url", required=True, help="reactor's public URL of POST /webhooks/twenty")
    webhook_actions.add_parser("status", help="show what Twenty sends where")
    sim = commands.add_parser("sim", help="run the Twenty simulator (for developing against it)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=3000)
    sim.add_argument("--token", default="sim-token", help="the API key it accepts (Authorization: Bearer …)")
    sim.add_argument("--members", type=int, default=3, help="workspace members to seed")
    sim.add_argument("--tasks", type=int, default=0, help="open tasks to seed, spread over the members")
    sim.add_argument("--latency-ms", type=float, default=0.0, help="added to every answer")
    sim.add_argument("--rate-limit", type=int, default=None, help="record calls per minute (429 beyond)")
    sim.add_argument("--error-rate", type=float, default=0.0, help="share of record calls answered 500")
    sim.add_argument("--drop-rate", type=float, default=0.0, help="share of webhook deliveries dropped")
    sim.add_argument("--duplicate-rate", type=float, default=0.0, help="share of webhook deliveries sent twice")
    sim.add_argument("--reorder-ms", type=float, default=0.0, help="deliveries wait a random 0..N ms (reordering)")
    sim.add_argument("--seed", type=int, default=None, help="seed of the fault randomness")
    sim.add_argument("--legacy-task-targets", action="store_true", help="answer as the 1.16-era server (personId, …)")
    dev = commands.add_parser("dev", help="run everything locally: databases, simulated Twenty, web and worker")
    dev.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8000), help="the web port")
    dev.add_argument("--reset", action="store_true", help="start from empty: forget the last run's leads and caches")
    doctor = commands.add_parser("doctor", help="check configuration, PostgreSQL, Redis, Twenty and the webhook")
    doctor.add_argument("--webhook-url", help="reactor's webhook URL (default: every subscription to /webhooks/twenty)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except Exception as exc:
        if os.environ.get("LOG_LEVEL", "").upper() == "DEBUG":
            raise
        line = _outage(exc)
        if line is None:
            raise
        print(f"reactor {args.command}: {line}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "sim":
        from reactor import sim as simulator

        knobs = simulator.Knobs(
            latency_s=args.latency_ms / 1000, rate_limit=args.rate_limit, error_rate=args.error_rate,
            delivery=simulator.DeliveryKnobs(drop_rate=args.drop_rate, duplicate_rate=args.duplicate_rate,
                                             reorder_s=args.reorder_ms / 1000),
        )  # fmt: skip
        simulator.serve(host=args.host, port=args.port, token=args.token, members=args.members, tasks=args.tasks,
                        knobs=knobs, seed=args.seed, legacy_task_targets=args.legacy_task_targets)  # fmt: skip
        return 0

    if args.command == "dev":
        from reactor import dev as dev_mode

        _configure_logging("INFO")
        return dev_mode.run(port=args.port, reset=args.reset)

    try:
        settings = _load(args.command)
    except SettingsError as exc:
        if args.command == "doctor":
            print(f"✗ configuration: {exc}")
            return 1
        print(f"reactor: {exc}", file=sys.stderr)
        return 2
    # A one-shot command prints its own result; its INFO lines (retries, progress) only with LOG_LEVEL set.
    quiet = args.command not in ("web", "worker") and "LOG_LEVEL" not in os.environ
    _configure_logging("WARNING" if quiet else settings.log_level, settings.log_format, settings.log_pii)
    if args.command == "doctor":
        return asyncio.run(_doctor(settings, args.webhook_url))
    if args.command == "web":
        asyncio.run(_reach_postgres(settings))  # else uvicorn's lifespan prints a traceback
        run_web(settings, args.host, args.port)
    elif args.command == "worker" and args.check:
        return _check_worker(settings)
    elif args.command == "worker":
        return run_worker(settings)
    elif args.command == "dashboard-link":
        from reactor.api.dashboard import sign_token

        source = args.source or next(iter(settings.lead_api_keys))
        if source not in settings.lead_api_keys:
            print(f"reactor: no lead source {source!r} in LEAD_API_KEYS", file=sys.stderr)
            return 2
        expires = int(time.time() + args.hours * 3600)
        token = sign_token(source, settings.lead_api_keys[source].get_secret_value(), expires_at=expires)
        print(f"{args.url.rstrip('/')}/?token={token}")
        return 0
    elif args.command == "reconcile":
        if not _require_twenty(settings, "reactor reconcile"):
            return 2
        return asyncio.run(_reconcile(settings, dry_run=args.dry_run, check=args.check, as_json=args.json))
    elif args.command == "webhook":
        if not _require_twenty(settings, "reactor webhook"):
            return 2
        if args.action == "install" and (problem := webhook_url_problem(args.url)):
            print(f"reactor webhook install: {problem}, e.g. https://reactor.example.com/webhooks/twenty",
                  file=sys.stderr)  # fmt: skip
            return 2
        return asyncio.run(_webhook(settings, args.action, getattr(args, "url", None)))
    elif args.command == "migrate":
        run_migrate(settings)
    elif args.command == "replay":
        return asyncio.run(_replay(settings, args.job, args.id))
    return 0
