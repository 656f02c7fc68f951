"""Resident memory of reactor's processes under work: the Twenty simulator, `reactor web` and `reactor worker`, each
its own process as in production. Posts N leads, waits until every one is synced with a follow-up, then reads
each process's VmRSS (and its peak, VmHWM) from /proc.

    .venv/bin/python bench/memory.py [--leads 2000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, scratch_database, scratch_redis_url, servers  # noqa: E402
from reactor import subscription  # noqa: E402
from reactor.devstack import free_port  # noqa: E402
from reactor.twenty import TwentyClient, create_http_client  # noqa: E402

TOKEN = "bench-token"
LOGS = ROOT / ".reactor" / "bench-logs"


def memory(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[{"VmRSS": "rss_mib", "VmHWM": "peak_rss_mib"}[name]] = round(int(value.split()[0]) / 1024, 1)
    return fields


async def wait_up(url: str) -> None:
    async with httpx.AsyncClient(timeout=1) as http:
        for _ in range(300):
            try:
                if (await http.get(url)).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with servers() as (pg, rd):
        redis_url = scratch_redis_url(rd.url)
        async with scratch_database(pg.url) as database_url:
            sim_port, web_port = free_port(), free_port()
            sim_url, web_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{web_port}"
            env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "LEAD_API_KEYS": "b:bench",
                   "TWENTY_REST_URL": f"{sim_url}/rest", "TWENTY_REST_TOKEN": TOKEN, "LOG_LEVEL": "WARNING",
                   "TWENTY_RATE_LIMIT": "100000"}  # fmt: skip
            processes: dict[str, asyncio.subprocess.Process] = {}
            LOGS.mkdir(parents=True, exist_ok=True)

            async def start(name: str, *argv: str) -> None:
                log = (LOGS / f"{name}.log").open("wb")
                processes[name] = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "reactor", *argv, env=env, cwd=ROOT,
                    stdout=log, stderr=asyncio.subprocess.STDOUT,
                )  # fmt: skip

            try:
                await start("sim", "sim", "--port", str(sim_port), "--token", TOKEN, "--members", "5")
                await wait_up(f"{sim_url}/sim/state")
                async with create_http_client(f"{sim_url}/rest", TOKEN) as http:
                    installed = await subscription.install(TwentyClient(http), f"{web_url}/webhooks/twenty")
                env["TWENTY_WEBHOOK_SECRET"] = installed.secret or ""
                await start("web", "web", "--host", "127.0.0.1", "--port", str(web_port))
                await start("worker", "worker")
                await wait_up(f"{web_url}/healthz")
                idle = {name: memory(p.pid) for name, p in processes.items()}
                started = time.perf_counter()
                limits = httpx.Limits(max_connections=16)
                async with httpx.AsyncClient(base_url=web_url, headers={"X-API-Key": "bench"}, limits=limits,
                                             timeout=30) as http:  # fmt: skip
                    for start_at in range(0, args.leads, 100):
                        batch = range(start_at, min(start_at + 100, args.leads))
                        answers = await asyncio.gather(
                            *(http.post("/leads", json={"first_name": f"M{i}", "email": f"m{i}@example.com"})
                              for i in batch)
                        )  # fmt: skip
                        assert all(a.status_code == 201 for a in answers), answers[0].text
                conn = await asyncpg.connect(database_url)
                try:
                    while time.perf_counter() - started < 300:
                        done = await conn.fetchval("SELECT count(*) FROM follow_ups WHERE state = 'open'")
                        if done >= args.leads:
                            break
                        await asyncio.sleep(0.5)
                finally:
                    await conn.close()
                elapsed = time.perf_counter() - started
                loaded = {name: memory(p.pid) for name, p in processes.items()}
            finally:
                for process in processes.values():
                    if process.returncode is None:
                        process.send_signal(signal.SIGTERM)
                for process in processes.values():
                    await asyncio.wait_for(process.wait(), 30)
                async with Redis.from_url(redis_url) as redis:
                    await redis.flushdb()
    return {"machine": machine(), "leads": args.leads, "follow_ups_open": done, "seconds": round(elapsed, 1),
            "idle": idle, "after_work": loaded}  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leads", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(run(arguments)), indent=None if arguments.json else 2))
