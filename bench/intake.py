"""Benchmark POST /leads against a real `reactor web` process (uvicorn) on a fresh database.

70 % of the requests are new people, 30 % repeat an earlier one (the dedupe path). Prints requests/s and latency
percentiles, and checks the outcome: one row per person, every submission counted.

    .venv/bin/python bench/intake.py [--requests 5000] [--concurrency 32] [--json]

The load generator runs on the same machine as the server, so both share its CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import sys
import time
from pathlib import Path

import asyncpg
import httpx
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, percentile, scratch_database, scratch_redis_url, servers  # noqa: E402
from reactor.devstack import free_port  # noqa: E402


def lead(person: int) -> dict[str, object]:
    return {
        "first_name": f"Bench{person}",
        "last_name": "Person",
        "email": f"bench.{person}@example.com",
        "phone": f"+1415555{person % 10000:04d}" if person < 10000 else None,
        "address": {"city": "San Francisco", "country": "US"},
        "current_credit": 2500,
        "utm_source": "bench",
    }


async def drive(
    base_url: str, key: str, requests: int, concurrency: int, seed: int
) -> tuple[list[float], dict[int | str, int]]:
    rng = random.Random(seed)
    plan: list[int] = []
    people = 0
    for _ in range(requests):
        if people and rng.random() < 0.30:
            plan.append(rng.randrange(people))
        else:
            plan.append(people)
            people += 1
    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for person in plan:
        queue.put_nowait(person)

    async with httpx.AsyncClient(
        base_url=base_url,
        headers={"X-API-Key": key},
        timeout=30,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    ) as http:

        async def worker() -> None:
            while not queue.empty():
                person = queue.get_nowait()
                started = time.perf_counter()
                try:
                    response = await http.post("/leads", json=lead(person))
                except httpx.TransportError as exc:  # counted, not fatal: the report shows it
                    outcome: int | str = type(exc).__name__
                else:
                    outcome = response.status_code
                latencies.append(time.perf_counter() - started)
                statuses[outcome] = statuses.get(outcome, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, statuses


async def wait_ready(base_url: str, process: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=1) as http:
        for _ in range(200):
            if process.returncode is not None:
                raise SystemExit(f"reactor web exited with {process.returncode}")
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("reactor web did not become ready")


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process, from /proc (Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return round(kib / 1024, 1) if kib else None


async def measure(kind: str, args: argparse.Namespace, pg_url: str, redis_url: str) -> dict[str, object]:
    """One server (reactor's web process, or the baseline) on a fresh database, driven the same way."""
    async with scratch_database(pg_url) as database_url:
        key = secrets.token_urlsafe(16)
        port = free_port()
        env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "LEAD_API_KEYS": f"bench:{key}",
               "LOG_LEVEL": "WARNING", "DB_POOL_SIZE": str(args.pool)}  # fmt: skip
        env.pop("TWENTY_REST_URL", None)
        argv = (["-m", "reactor", "web", "--host", "127.0.0.1", "--port", str(port)] if kind == "reactor" else
                ["-m", "uvicorn", "bench.baseline_intake:app", "--host", "127.0.0.1", "--port", str(port),
                 "--log-level", "critical"])  # fmt: skip
        process = await asyncio.create_subprocess_exec(sys.executable, *argv, env=env, cwd=ROOT)
        try:
            base_url = f"http://127.0.0.1:{port}"
            await wait_ready(base_url, process)
            await drive(base_url, key, 200, args.concurrency, seed=1)  # warm-up: connections, caches
            started = time.perf_counter()
            latencies, statuses = await drive(base_url, key, args.requests, args.concurrency, seed=2)
            elapsed = time.perf_counter() - started
            rss = rss_mib(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)
            async with Redis.from_url(redis_url) as redis:
                await redis.flushdb()
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetchval("SELECT count(*) FROM leads")
            submissions = await conn.fetchval("SELECT sum(submission_count) FROM leads")
        finally:
            await conn.close()
    latencies.sort()
    return {
        "statuses": statuses,
        "requests_per_s": round(args.requests / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p90_ms": round(percentile(latencies, 0.90) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "leads_rows": rows,
        "submissions_counted": submissions,
        "web_rss_mib": rss,
    }


async def main(args: argparse.Namespace) -> dict[str, object]:
    with servers() as (pg, rd):
        redis_url = scratch_redis_url(rd.url)
        report: dict[str, object] = {"machine": machine(), "postgres": pg.origin, "redis": rd.origin,
                                     "requests": args.requests, "concurrency": args.concurrency}  # fmt: skip
        report["reactor"] = await measure("reactor", args, pg.url, redis_url)
        if args.baseline:
            report["baseline_connection_per_request"] = await measure("baseline", args, pg.url, redis_url)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pool", type=int, default=10, help="DB_POOL_SIZE of the web process")
    parser.add_argument("--baseline", action="store_true", help="also measure bench/baseline_intake.py, the same way")
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    result = asyncio.run(main(arguments))
    if arguments.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:>20}: {value}")
