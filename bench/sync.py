"""Benchmark the backlog sync: 10,000 unsynced leads against a mocked Twenty that answers after 50 ms and, like
Twenty, allows TWENTY_RATE_LIMIT calls a minute (429 beyond), beside the one-call-per-lead approach.

The batch path is reactor's own drain (`drain.sync_all_leads`: rounds until no lead waits, each a trash read and a
batch upsert, the shared Redis token bucket), run to the end. The one-call-per-lead path (an upsert per lead through the
same client and bucket) would take 10,000 / TWENTY_RATE_LIMIT minutes, so it runs for `--per-lead-seconds` and is
projected from its rate.

    .venv/bin/python bench/sync.py [--leads 10000] [--rate-limit 100] [--per-lead-seconds 60] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import respx
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, scratch_database, scratch_redis_url, servers
from reactor import drain
from reactor.resources import open_resources
from reactor.settings import load_settings
from reactor.twenty import PersonInput, TwentyClient

TWENTY = "http://twenty.bench/rest"
LATENCY_S = 0.05


class MockTwenty:
    """Answers after LATENCY_S; a token bucket of `limit` per 60 s answers 429 (no Retry-After) when empty."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.tokens = float(limit)
        self.at = time.monotonic()
        self.calls: Counter[str] = Counter()

    def _take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.limit, self.tokens + (now - self.at) * self.limit / 60)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(LATENCY_S)
        if not self._take():
            self.calls["429"] += 1
            return httpx.Response(429, json={"statusCode": 429, "messages": ["Limit reached"]})
        if request.method == "GET":
            self.calls["list"] += 1
            info = {"hasNextPage": False, "endCursor": None}
            return httpx.Response(200, json={"data": {"people": []}, "totalCount": 0, "pageInfo": info})
        body = json.loads(request.content)
        if isinstance(body, list):
            self.calls["batch"] += 1
            people = [{"id": str(uuid.uuid4()), **record} for record in body]
            return httpx.Response(201, json={"data": {"createPeople": people}})
        self.calls["one"] += 1
        return httpx.Response(201, json={"data": {"createPerson": {"id": str(uuid.uuid4()), **body}}})


async def seed(database_url: str, count: int) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.copy_records_to_table(
            "leads",
            records=[(f"bench{i}", f"bench.{i}@example.com", "Bench", str(i), "bench") for i in range(count)],
            columns=["lead_id", "email", "first_name", "last_name", "api_source"],
        )
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "leads": args.leads, "rate_limit_per_min": args.rate_limit,
                              "twenty_latency_ms": LATENCY_S * 1000}  # fmt: skip
    with servers() as (pg, rd):
        redis_url = scratch_redis_url(rd.url)
        async with scratch_database(pg.url) as database_url:
            await seed(database_url, args.leads)
            settings = load_settings(
                None, DATABASE_URL=database_url, REDIS_URL=redis_url, LEAD_API_KEYS="bench:bench",
                TWENTY_REST_URL=TWENTY, TWENTY_REST_TOKEN="bench", TWENTY_RATE_LIMIT=str(args.rate_limit),
                TWENTY_RATE_WINDOW_S="60", LOG_LEVEL="WARNING",
            )  # fmt: skip
            async with Redis.from_url(redis_url) as redis:
                await redis.flushdb()

            mock = MockTwenty(args.rate_limit)
            with respx.mock(assert_all_called=False) as router:
                router.route(url__startswith=TWENTY).mock(side_effect=mock)
                async with open_resources(settings) as res:
                    assert res.twenty is not None
                    started = time.perf_counter()
                    pushed, _ = await drain.sync_all_leads(res)
                    synced = len(pushed.synced)
                    elapsed = time.perf_counter() - started
            report["batch"] = {
                "synced": synced,
                "seconds": round(elapsed, 1),
                "leads_per_min": round(synced / elapsed * 60),
                "twenty_calls": sum(v for k, v in mock.calls.items() if k != "429"),
                "calls_by_kind": dict(mock.calls),
                "http_429": mock.calls["429"],
            }

            async with Redis.from_url(redis_url) as redis:
                await redis.flushdb()  # a full bucket again: the same start as the batch run
            mock = MockTwenty(args.rate_limit)
            with respx.mock(assert_all_called=False) as router:
                router.route(url__startswith=TWENTY).mock(side_effect=mock)
                async with open_resources(settings) as res:
                    assert res.twenty is not None
                    synced, elapsed = await one_call_per_lead(res.twenty, args.leads, args.per_lead_seconds)
            steady = args.rate_limit  # leads/min once the bucket's initial burst is spent
            report["one_call_per_lead"] = {
                "synced_in_window": synced,
                "seconds": round(elapsed, 1),
                "leads_per_min": round(synced / elapsed * 60),
                "twenty_calls": sum(v for k, v in mock.calls.items() if k != "429"),
                "http_429": mock.calls["429"],
                "projected_minutes_for_all": round(args.leads / steady, 1),
            }
            async with Redis.from_url(redis_url) as redis:
                await redis.flushdb()
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return report


async def one_call_per_lead(twenty: TwentyClient, leads: int, seconds: float) -> tuple[int, float]:
    synced = 0
    started = time.perf_counter()
    for i in range(leads):
        if time.perf_counter() - started >= seconds:
            break
        await twenty.upsert_person(PersonInput(first_name="Bench", last_name=str(i), email=f"bench.{i}@example.com"))
        synced += 1
    return synced, time.perf_counter() - started


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leads", type=int, default=10_000)
    parser.add_argument("--rate-limit", type=int, default=100, help="Twenty calls a minute (TWENTY_RATE_LIMIT)")
    parser.add_argument("--per-lead-seconds", type=float, default=60.0)
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    outcome = asyncio.run(run(arguments))
    print(json.dumps(outcome, indent=None if arguments.json else 2))
