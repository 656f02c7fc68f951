"""`reactor dev`: the whole service on one machine for a newcomer, in one command.

Refuses a port already taken, finds PostgreSQL and Redis (configured, local, or embedded: see devstack), creates
and migrates a `reactor` database on a local or embedded server, starts clean when Twenty is the simulator (which
keeps nothing between runs) or with --reset, makes a lead-source API key once (.reactor/dev-api-key), starts the
simulator, web and worker, writes .reactor/dev.env for a second terminal, runs `reactor doctor`, prints what to
try, and stops everything cleanly on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import asyncpg
import httpx
from dotenv import dotenv_values
from redis.exceptions import RedisError

from reactor import devstack
from reactor.db import migrate
from reactor.settings import SettingsError, load_settings

DATA_DIR = Path(".reactor")
DEV_DATABASE = "reactor"
API_KEY_FILE = DATA_DIR / "dev-api-key"
# What a second terminal needs to reach this stack (written to .reactor/dev.env while it runs).
SECOND_TERMINAL = ("DATABASE_URL", "REDIS_URL", "LEAD_API_KEYS", "TWENTY_REST_URL", "TWENTY_REST_TOKEN",
                   "TWENTY_WEBHOOK_SECRET", "LOG_FORMAT")  # fmt: skip


def _project_env() -> dict[str, str]:
    """The environment, over the project's optional .env (the environment wins, as in Settings)."""
    env = {k: v for k, v in dotenv_values(".env").items() if v is not None} if Path(".env").is_file() else {}
    env.update(os.environ)
    return env


def _dev_api_key() -> str:
    path = API_KEY_FILE
    if not path.is_file():
        DATA_DIR.mkdir(exist_ok=True)
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


async def _prepare_database(server: devstack.Backend) -> str:
    """The dev database's URL: the configured one as is, else a `reactor` database created on the server."""
    url = server.url
    if server.origin != "configured":
        admin = await asyncpg.connect(url, timeout=10)
        try:
            if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DEV_DATABASE):
                await admin.execute(f'CREATE DATABASE "{DEV_DATABASE}"')
        finally:
            await admin.close()
        base, _, query = url.partition("?")
        url = f"{base.rsplit('/', 1)[0]}/{DEV_DATABASE}" + (f"?{query}" if query else "")
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return url


def _wait_ready(base_url: str, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the web process exited with status {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the web process was not ready within {timeout_s:.0f} s")


@contextlib.contextmanager
def _children(
    commands: Mapping[str, list[str]], env: Mapping[str, str]
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    processes = {name: subprocess.Popen(argv, env=dict(env)) for name, argv in commands.items()}
    try:
        yield processes
    finally:
        # A terminal's Ctrl-C reached the children too; a second one must not cut their shutdown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=25)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_sim(base_url: str, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Twenty simulator exited with status {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/sim/state", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the Twenty simulator was not ready within {timeout_s:.0f} s")


async def _install_webhook(rest_url: str, token: str, target: str) -> str:
    from reactor import subscription
    from reactor.twenty import TwentyClient, create_http_client

    async with create_http_client(rest_url, token) as http:
        installed = await subscription.install(TwentyClient(http), target)
    assert installed.secret is not None
    return installed.secret


def _banner(base_url: str, source: str, api_key: str, pg: devstack.Backend, rd: devstack.Backend, twenty: str) -> str:
    from reactor.api.dashboard import sign_token

    dashboard = f"{base_url}/?token={sign_token(source, api_key, expires_at=int(time.time()) + 12 * 3600)}"
    curl = (
        f"curl -s -X POST {base_url}/leads -H 'X-API-Key: {api_key}' -H 'Content-Type: application/json' "
        """-d '{"first_name":"Ada","last_name":"Lovelace","email":"ada@example.com","phone":"+14155552671"}'"""
    )
    return "\n".join(
        [
            "",
            "reactor dev is running: web, worker" + (" and the Twenty simulator" if "simulator" in twenty else ""),
            f"  {pg.describe('postgres')}",
            f"  {rd.describe('redis')}",
            f"  twenty     {twenty}",
            f"  API        {base_url}   (docs: {base_url}/docs, metrics: {base_url}/metrics)",
            f"  dashboard  {dashboard}",
            f"  API key    {api_key}   (LEAD_API_KEYS's first source, else made once and kept in {API_KEY_FILE})",
            "  try it: post a lead, then read it back; within a second it shows its Person and its assigned",
            "  follow-up task (crm_person_id, follow_up), and the worker's log says followup.created:",
            f"    {curl}",
            f"    curl -s {base_url}/leads/<lead_id> -H 'X-API-Key: {api_key}'",
            f"  a second terminal in this folder uses this stack ({devstack.DEV_ENV}, removed at exit), e.g.",
            f"    reactor doctor; reactor reconcile --check; reactor dashboard-link --url {base_url}",
            "  Ctrl-C stops everything.",
            "",
        ]
    )


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a supervisor's SIGTERM stops everything as Ctrl-C does


def port_taken(port: int) -> bool:
    """Whether something already listens on the port (another `reactor dev`, or any server)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return devstack.port_open("127.0.0.1", port)


async def _start_clean(database_url: str, redis_url: str) -> None:
    """Empty reactor's tables and Redis keys: the last run's leads, follow-ups, caches and queued jobs."""
    from redis.asyncio import Redis

    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        tables = [
            r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        if tables:
            names = ", ".join('"' + t.replace('"', '""') + '"' for t in tables)
            await conn.execute(f"TRUNCATE {names} CASCADE")
    finally:
        await conn.close()
    client = Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        for pattern in ("reactor:*", "arq:*"):  # only reactor's keys: the database may be shared
            async for key in client.scan_iter(match=pattern, count=500):
                await client.delete(key)
    finally:
        await client.aclose()


def _say(message: str) -> None:
    print(f"reactor dev: {message}", file=sys.stderr, flush=True)


def _doctor(child_env: Mapping[str, str], webhook_url: str) -> None:
    from reactor import doctor

    settings = load_settings(None, **child_env)
    checks = asyncio.run(doctor.run(settings, webhook_url=webhook_url))
    print("reactor doctor:\n" + "\n".join(f"  {check.line()}" for check in checks), flush=True)


def run(port: int, reset: bool = False) -> int:
    """Run the whole service until Ctrl-C. With the simulator (which keeps nothing) every run starts clean; with a
    real Twenty the database and Redis keep their state unless `reset`."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    if port_taken(port):
        _say(f"port {port} is taken: another server listens on 127.0.0.1:{port}. Stop it, or run reactor dev --port N")
        return 2
    env = _project_env()
    simulated = not env.get("TWENTY_REST_URL")
    try:
        load_settings(None, **{"LEAD_API_KEYS": "dev:check", **env})  # one message for every bad variable, once
    except SettingsError as exc:
        _say(str(exc))
        return 2
    with devstack.postgres(env, DATA_DIR / "dev") as pg, devstack.redis(env, DATA_DIR / "dev") as rd:
        _say(f"{pg.describe('postgres')}; {rd.describe('redis')}")
        try:
            database_url = asyncio.run(_prepare_database(pg))
            if simulated or reset:
                asyncio.run(_start_clean(database_url, rd.url))
                why = "--reset" if reset else "the simulator keeps nothing between runs"
                _say(f"starting clean ({why}): reactor's tables and Redis keys emptied")
        except (OSError, TimeoutError, asyncpg.PostgresError, RedisError) as exc:
            from reactor.doctor import unreachable

            _say(unreachable(exc, postgres_dsn=pg.url, redis_url=rd.url, twenty_url=None) or repr(exc))
            return 2
        return _serve(port, env, simulated, pg, rd, database_url)


def _serve(port: int, env: dict[str, str], simulated: bool, pg: devstack.Backend, rd: devstack.Backend,
           database_url: str) -> int:  # fmt: skip
    keys = env.get("LEAD_API_KEYS") or f"dev:{_dev_api_key()}"
    api_key = keys.split(",")[0].partition(":")[2].strip()
    child_env = {"LOG_FORMAT": "text", **env, "DATABASE_URL": database_url, "REDIS_URL": rd.url,
                 "LEAD_API_KEYS": keys}  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    sim: dict[str, list[str]] = {}
    if simulated:
        sim_port, token = devstack.free_port(), "dev-sim-token"
        sim["sim"] = [sys.executable, "-m", "reactor", "sim", "--port", str(sim_port), "--token", token,
                      "--members", "3"]  # fmt: skip
        child_env |= {"TWENTY_REST_URL": f"http://127.0.0.1:{sim_port}/rest", "TWENTY_REST_TOKEN": token}
    twenty = (f"the simulator at http://127.0.0.1:{sim_port} (its truth: /sim/state)" if simulated
              else child_env["TWENTY_REST_URL"])  # fmt: skip
    app = {
        "web": [sys.executable, "-m", "reactor", "web", "--host", "127.0.0.1", "--port", str(port)],
        "worker": [sys.executable, "-m", "reactor", "worker"],
    }
    with _children(sim, child_env) as sims:
        try:
            if simulated:
                _wait_sim(f"http://127.0.0.1:{sim_port}", sims["sim"])
                child_env["TWENTY_WEBHOOK_SECRET"] = asyncio.run(_install_webhook(
                    child_env["TWENTY_REST_URL"], token, f"{base_url}/webhooks/twenty"))  # fmt: skip
            shared = {name: child_env[name] for name in SECOND_TERMINAL if child_env.get(name)}
            devstack.write_dev_env(shared)
            with _children(app, child_env) as processes:
                _wait_ready(base_url, processes["web"])
                _doctor(child_env, f"{base_url}/webhooks/twenty")
                source = keys.split(",")[0].partition(":")[0].strip()
                print(_banner(base_url, source, api_key, pg, rd, twenty), flush=True)
                everything = {**processes, **sims}
                while all(p.poll() is None for p in everything.values()):
                    time.sleep(0.5)
                dead = ", ".join(f"{name} (status {p.returncode})" for name, p in everything.items()
                                 if p.poll() is not None)  # fmt: skip
                _say(f"stopping: {dead} exited on its own; its log is above")
                return 1
        except RuntimeError as exc:
            _say(f"{exc}; its log is above")
            return 1
        except KeyboardInterrupt:
            print("\nreactor dev: stopping…", flush=True)
            return 0
        finally:
            with contextlib.suppress(FileNotFoundError):
                devstack.DEV_ENV.unlink()
