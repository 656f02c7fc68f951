"""What the benchmarks share: a throwaway database on the PostgreSQL reactor would use, and the machine's name."""

from __future__ import annotations

import contextlib
import os
import platform
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg

from reactor import devstack
from reactor.db import migrate

DATA_DIR = Path(".reactor")


@contextlib.contextmanager
def servers() -> Iterator[tuple[devstack.Backend, devstack.Backend]]:
    with devstack.postgres(os.environ, DATA_DIR) as pg, devstack.redis(os.environ, DATA_DIR) as rd:
        print(pg.describe("postgres"))
        print(rd.describe("redis"))
        yield pg, rd


@contextlib.asynccontextmanager
async def scratch_database(server_url: str) -> AsyncIterator[str]:
    """A new, migrated database, dropped afterwards."""
    name = f"reactor_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    base, _, query = server_url.partition("?")
    url = f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
    try:
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def machine() -> str:
    cpus = os.cpu_count()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{platform.system()} {platform.machine()}, {cpus} CPUs ({model}), Python {platform.python_version()}"


def scratch_redis_url(server_url: str, db: int = 15) -> str:
    """A Redis database of the benchmark's own (flush it when done), not the one the service uses."""
    base = server_url.rstrip("/")
    head, _, tail = base.rpartition("/")
    return f"{head if tail.isdigit() else base}/{db}"


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]
