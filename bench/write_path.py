"""Benchmark the write path to Twenty, this tree beside an earlier design (a git revision) in the same run.

Each design runs as real processes — `reactor web` and `reactor worker` from its own code, its own PostgreSQL
database (migrated by its own `reactor migrate`) and its own Redis — against the same Twenty simulator
(`reactor sim`, from this tree) with 5 members, 20 ms latency and a rate limit:

1. burst: N leads posted at once (100 calls a minute): seconds until every lead is a Person with one linked,
   assigned follow-up; Twenty calls per lead; 429s; the spread of the loads.
2. idle: one lead at a time, 10 times, 6 s apart (an idle system: its call budget recovered): POST -> follow-up
   linked (p50, p90).
3. backlog: M leads posted while the worker is down, then the worker starts (79 calls a minute, what a real
   self-hosted Twenty accepts): seconds until all are followed up (capped by --backlog-cap-s; then the share done).

    .venv/bin/python bench/write_path.py [--baseline 7f6dbc9] [--leads 300] [--backlog 10000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, servers  # noqa: E402
from reactor import subscription  # noqa: E402
from reactor.devstack import free_port  # noqa: E402
from reactor.twenty import TwentyClient, create_http_client  # noqa: E402

TOKEN = "bench-token"
KEY = "bench-key"
MEMBERS = 5


@dataclass
class Design:
    name: str
    code: Path  # where its `reactor` package is
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    logs: Path = Path("/tmp")

    def start(self, name: str, *args: str) -> None:
        log = (self.logs / f"{self.name}-{name}.log").open("ab")
        self.processes[name] = subprocess.Popen([sys.executable, "-m", "reactor", *args], env=self.env,
                                                cwd=self.code, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def checkout(revision: str) -> Path:
    """A detached worktree of `revision` (kept for later runs)."""
    target = Path("/tmp") / f"reactor-bench-{revision}"
    if not (target / "reactor").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(target), revision],
                       check=True, capture_output=True)  # fmt: skip
    return target


async def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code < 500:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextlib.asynccontextmanager
async def database(server_url: str) -> AsyncIterator[str]:
    name = f"reactor_wp_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server_url.rsplit('/', 1)[0]}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@contextlib.asynccontextmanager
async def stack(design: Design, pg_url: str, *, rate_limit: int) -> AsyncIterator[tuple[str, str, asyncpg.Pool]]:
    """Simulator, Redis, web and worker for one design. Yields (web url, sim url, a pool on its database)."""
    sim_port, web_port, redis_port = free_port(), free_port(), free_port()
    sim_url, web_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{web_port}"
    redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)  # fmt: skip
    async with database(pg_url) as db_url:
        design.env = {**os.environ, "PYTHONPATH": str(design.code), "DATABASE_URL": db_url,
                      "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "LEAD_API_KEYS": f"bench:{KEY}",
                      "TWENTY_REST_URL": f"{sim_url}/rest", "TWENTY_REST_TOKEN": TOKEN,
                      "TWENTY_RATE_LIMIT": str(rate_limit), "LOG_LEVEL": "WARNING", "DB_POOL_SIZE": "10"}  # fmt: skip
        subprocess.run([sys.executable, "-m", "reactor", "migrate"], env=design.env, cwd=design.code, check=True,
                       capture_output=True)  # fmt: skip
        here = Design("sim", ROOT, env={**os.environ, "LOG_LEVEL": "WARNING"}, logs=design.logs)
        here.start("sim", "sim", "--port", str(sim_port), "--token", TOKEN, "--members", str(MEMBERS),
                   "--latency-ms", "20", "--rate-limit", str(rate_limit), "--seed", "1")  # fmt: skip
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=3)
        assert pool is not None
        try:
            await wait_http(f"{sim_url}/sim/state")
            async with create_http_client(f"{sim_url}/rest", TOKEN) as http:
                installed = await subscription.install(TwentyClient(http), f"{web_url}/webhooks/twenty")
            design.env["TWENTY_WEBHOOK_SECRET"] = installed.secret or ""
            design.start("web", "web", "--host", "127.0.0.1", "--port", str(web_port))
            await wait_http(f"{web_url}/healthz")
            yield web_url, sim_url, pool
        finally:
            for name in list(design.processes):
                design.stop(name)
            here.stop("sim")
            await pool.close()
            redis.terminate()
            redis.wait()


async def sim_state(sim_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        state: dict[str, Any] = (await http.get(f"{sim_url}/sim/state")).json()
    return state


async def knobs(sim_url: str, **values: Any) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        (await http.patch(f"{sim_url}/sim/knobs", json=values)).raise_for_status()


async def post(web_url: str, leads: list[dict[str, Any]]) -> list[str]:
    limits = httpx.Limits(max_connections=32)
    gate = asyncio.Semaphore(32)  # at most 32 in flight: a large backlog is posted, not a connection storm

    async def one(http: httpx.AsyncClient, lead: dict[str, Any]) -> httpx.Response:
        async with gate:
            for attempt in range(3):  # a kept-alive connection the server closed meanwhile: POST /leads is idempotent
                try:
                    return await http.post("/leads", json=lead)
                except httpx.TransportError:
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    async with httpx.AsyncClient(base_url=web_url, headers={"X-API-Key": KEY}, timeout=60, limits=limits) as http:
        answers = await asyncio.gather(*(one(http, lead) for lead in leads))
    assert all(a.status_code in (200, 201) for a in answers), [a.text for a in answers if a.status_code >= 300]
    return [str(a.json()["lead_id"]) for a in answers]


async def followed_up(pool: asyncpg.Pool, lead_ids: list[str]) -> int:
    """Leads whose person has an open follow-up: linked and assigned (both designs' `open`)."""
    return int(await pool.fetchval(
        """SELECT count(*) FROM leads l WHERE l.lead_id = ANY($1) AND l.crm_synced AND EXISTS (
               SELECT 1 FROM follow_ups f WHERE f.person_id = l.crm_person_id AND f.state = 'open'
                 AND f.assignee_id IS NOT NULL)""", lead_ids))  # fmt: skip


async def until(pool: asyncpg.Pool, lead_ids: list[str], cap_s: float, poll_s: float = 0.05) -> tuple[float, int]:
    started = time.perf_counter()
    done = 0
    while time.perf_counter() - started < cap_s:
        done = await followed_up(pool, lead_ids)
        if done == len(lead_ids):
            break
        await asyncio.sleep(poll_s)
    return time.perf_counter() - started, done


def leads(prefix: str, count: int) -> list[dict[str, Any]]:
    return [{"first_name": f"{prefix}{i}", "last_name": "Bench", "email": f"{prefix}.{i}@example.com"}
            for i in range(count)]  # fmt: skip


def calls(state: dict[str, Any]) -> tuple[int, int]:
    by_kind = dict(state["calls"])
    limited = int(by_kind.pop("429", 0))
    by_kind.pop("5xx", None)
    return sum(int(v) for v in by_kind.values()), limited


async def burst_and_idle(design: Design, pg_url: str, count: int, cap_s: float, *, idle_leads: int = 10,
                         idle_gap_s: float = 6.0) -> dict[str, Any]:  # fmt: skip
    async with stack(design, pg_url, rate_limit=100) as (web, sim, pool):
        design.start("worker", "worker")
        await asyncio.sleep(3)  # the worker reads the members and counts the loads before the burst
        before, _ = calls(await sim_state(sim))
        ids = await post(web, leads("burst", count))
        seconds, done = await until(pool, ids, cap_s)
        await asyncio.sleep(2)  # the last webhooks land
        state = await sim_state(sim)
        spent, limited = calls(state)
        open_per_member = [int(n) for n in (state.get("open_tasks_by_member") or {}).values()]
        burst = {"leads": count, "followed_up": done, "seconds": round(seconds, 1),
                 "twenty_calls": spent - before, "calls_per_lead": round((spent - before) / max(done, 1), 3),
                 "http_429": limited, "open_tasks_by_member": open_per_member}  # fmt: skip
        latencies = []
        async with httpx.AsyncClient(base_url=web, headers={"X-API-Key": KEY}, timeout=60) as http:
            for i in range(idle_leads):
                await asyncio.sleep(idle_gap_s)  # idle: the pace has recovered, nothing else is waiting
                started = time.perf_counter()  # from the lead source's POST to the linked, assigned task
                answer = await http.post("/leads", json=leads(f"idle{i}x", 1)[0])
                assert answer.status_code == 201, answer.text
                lead_id = str(answer.json()["lead_id"])
                _elapsed, got = await until(pool, [lead_id], 30, poll_s=0.005)
                if got:
                    latencies.append((time.perf_counter() - started) * 1000)
        quantiles = statistics.quantiles(latencies, n=10) if len(latencies) > 1 else [float("nan")] * 9
        idle = {"p50_ms": round(statistics.median(latencies), 1) if latencies else None,
                "p90_ms": round(quantiles[8], 1), "n": len(latencies)}  # fmt: skip
    return {"burst": burst, "idle": idle}


async def backlog(design: Design, pg_url: str, count: int, cap_s: float) -> dict[str, Any]:
    async with stack(design, pg_url, rate_limit=79) as (web, sim, pool):
        ids = await post(web, leads("backlog", count))  # the worker is down
        before, _ = calls(await sim_state(sim))
        started = time.perf_counter()
        design.start("worker", "worker")
        _seconds, done = await until(pool, ids, cap_s, poll_s=1.0)
        spent, limited = calls(await sim_state(sim))
        return {"leads": count, "followed_up": done, "seconds": round(time.perf_counter() - started, 1),
                "twenty_calls": spent - before, "http_429": limited,
                "capped": done < count}  # fmt: skip


async def run(args: argparse.Namespace) -> dict[str, Any]:
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    current = (
        Design(f"this-{args.current}", checkout(args.current), logs=logs)
        if args.current
        else Design("this-tree", ROOT, logs=logs)
    )
    designs = [current] if args.no_baseline else [
        Design(f"baseline-{args.baseline}", checkout(args.baseline), logs=logs), current]  # fmt: skip
    report: dict[str, Any] = {"machine": machine(), "twenty_latency_ms": 20, "members": MEMBERS}
    with servers() as (pg, _rd):
        for design in designs:
            result = await burst_and_idle(design, pg.url, args.leads, args.burst_cap_s)
            print(json.dumps({design.name: result}), file=sys.stderr, flush=True)
            if args.backlog:
                result["backlog"] = await backlog(design, pg.url, args.backlog, args.backlog_cap_s)
            report[design.name] = result
            print(json.dumps({design.name: result}), file=sys.stderr)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="7f6dbc9", help="the revision of the design to compare with")
    parser.add_argument("--no-baseline", action="store_true", help="run only the new design (e.g. at full size)")
    parser.add_argument("--current", help="a revision to run as the new design (default: this working tree)")
    parser.add_argument("--leads", type=int, default=300)
    parser.add_argument("--burst-cap-s", type=float, default=600)
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--backlog-cap-s", type=float, default=900)
    parser.add_argument("--logs", default="/tmp/reactor-bench-logs")
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(run(arguments)), indent=None if arguments.json else 2))
