"""`reactor dev`: the whole service on one machine for a newcomer, in one command.

Finds PostgreSQL and Redis (configured, local, or embedded: see devstack), creates and migrates a `reactor`
database on a local or embedded server, makes a lead-source API key once (kept in .reactor/dev.env), starts the
web process, prints what to try, and stops everything cleanly on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import asyncpg
import httpx
from dotenv import dotenv_values

from reactor import devstack
from reactor.db import migrate

DATA_DIR = Path(".reactor")
DEV_DATABASE = "reactor"


def _project_env() -> dict[str, str]:
    """The environment, over the project's optional .env (the environment wins, as in Settings)."""
    env = {k: v for k, v in dotenv_values(".env").items() if v is not None} if Path(".env").is_file() else {}
    env.update(os.environ)
    return env


def _dev_api_key() -> str:
    path = DATA_DIR / "dev-api-key"
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
            f"  API key    {api_key}   (a lead source's key from LEAD_API_KEYS, else made once for 'dev')",
            "  try it: post a lead, then read it back; within a second it shows its Person and its assigned",
            "  follow-up task (crm_person_id, follow_up), and the worker's log says followup.created:",
            f"    {curl}",
            f"    curl -s {base_url}/leads/<lead_id> -H 'X-API-Key: {api_key}'",
            "  Ctrl-C stops everything.",
            "",
        ]
    )


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a supervisor's SIGTERM stops everything as Ctrl-C does


def run(port: int) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    env = _project_env()
    with devstack.postgres(env, DATA_DIR / "dev") as pg, devstack.redis(env, DATA_DIR / "dev") as rd:
        database_url = asyncio.run(_prepare_database(pg))
        keys = env.get("LEAD_API_KEYS") or f"dev:{_dev_api_key()}"
        api_key = keys.split(",")[0].partition(":")[2].strip()
        child_env = {"LOG_FORMAT": "text", **env, "DATABASE_URL": database_url, "REDIS_URL": rd.url,
                     "LEAD_API_KEYS": keys}  # fmt: skip
        base_url = f"http://127.0.0.1:{port}"
        simulated = not env.get("TWENTY_REST_URL")
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
                with _children(app, child_env) as processes:
                    _wait_ready(base_url, processes["web"])
                    source = keys.split(",")[0].partition(":")[0].strip()
                    print(_banner(base_url, source, api_key, pg, rd, twenty), flush=True)
                    while all(p.poll() is None for p in [*processes.values(), *sims.values()]):
                        time.sleep(0.5)
                    return 1  # a child died on its own
            except KeyboardInterrupt:
                print("\nreactor dev: stopping…", flush=True)
                return 0
