"""Benchmark the load-cache rebuild of a reconcile: N open tasks over 100 members, served by a mocked Twenty in
pages of at most 200. Prints list calls, time, and the Python heap's peak during the rebuild (tracemalloc), for
several N: the peak should not grow with N (pages are staged in Redis, one at a time).

    .venv/bin/python bench/reconcile.py [--tasks 10000 50000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, scratch_database, scratch_redis_url, servers
from reactor.assignees import rebuild_loads
from reactor.db import create_pool
from reactor.loadcache import LoadCache
from reactor.settings import load_settings
from reactor.twenty import TwentyClient, create_http_client

TWENTY = "http://twenty.bench/rest"


def tasks_mock(count: int) -> tuple[Any, dict[str, int]]:
    calls = {"list": 0}

    def serve(request: httpx.Request) -> httpx.Response:
        calls["list"] += 1
        limit = min(int(request.url.params.get("limit", "60")), 200)
        start = int(request.url.params.get("starting_after", "0"))
        stop = min(start + limit, count)
        page = [{"id": f"task-{i}", "assigneeId": f"member-{i % 100}", "status": "TODO",
                 "updatedAt": "2026-11-24T10:00:00.000Z", "deletedAt": None} for i in range(start, stop)]  # fmt: skip
        info = {"hasNextPage": stop < count, "endCursor": str(stop)}
        return httpx.Response(200, json={"data": {"tasks": page}, "totalCount": count, "pageInfo": info})

    return serve, calls


async def one(count: int, redis_url: str, db: asyncpg.Pool) -> dict[str, Any]:
    settings = load_settings(None, LEAD_API_KEYS="b:b", LOG_LEVEL="WARNING")
    async with Redis.from_url(redis_url) as redis:
        await redis.flushdb()
        cache = LoadCache(redis, load_statuses=["TODO"], workspace="bench")
        serve, calls = tasks_mock(count)
        # httpx's MockTransport keeps nothing per call (respx records every call, which would grow the heap).
        async with create_http_client(TWENTY, "bench", transport=httpx.MockTransport(serve)) as http:
            twenty = TwentyClient(http)
            tracemalloc.start()
            started = time.perf_counter()
            rebuilt = await rebuild_loads(twenty, cache, db, settings)
            elapsed = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        redis_bytes = (await redis.info("memory"))["used_memory_dataset"]
        await redis.flushdb()
    return {
        "open_tasks": sum(rebuilt.after.values()),
        "members": len(rebuilt.after),
        "list_calls": calls["list"],
        "seconds": round(elapsed, 2),
        "python_heap_peak_mib": round(peak / 2**20, 2),
        "redis_dataset_mib": round(redis_bytes / 2**20, 2),
    }


async def run(sizes: list[int]) -> dict[str, Any]:
    with servers() as (pg, rd):
        redis_url = scratch_redis_url(rd.url)
        async with scratch_database(pg.url) as database_url:
            db = await create_pool(database_url, size=2)
            try:
                return {"machine": machine(), "runs": [await one(n, redis_url, db) for n in sizes]}
            finally:
                await db.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(run(arguments.tasks)), indent=None if arguments.json else 2))
