"""The composition root: the only code that opens pools and clients, once per process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from reactor.db import create_pool
from reactor.settings import Settings


@dataclass(frozen=True)
class Resources:
    settings: Settings
    db: asyncpg.Pool
    redis: Redis


@contextlib.asynccontextmanager
async def open_resources(settings: Settings) -> AsyncIterator[Resources]:
    db = await create_pool(settings.postgres_dsn, size=settings.db_pool_size)
    redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        yield Resources(settings=settings, db=db, redis=redis)
    finally:
        await redis.aclose()
        await db.close()
