"""Benchmark follow-up assignment against a mocked Twenty (respx), LLM off.

1. Latency: signed `person.created` webhooks go to the app (in its lifespan, over ASGI); a real arq worker in the
   same process creates the follow-ups in a mocked Twenty that answers after 20 ms. Measures webhook received ->
   task linked to its person, p50/p99, and Twenty calls per follow-up; beside the approach that counts each
   member's open tasks through the API for every assignment (a `limit=1` list per member, reading totalCount).
2. Backfill under Twenty's rate limit: 1,214 people without follow-ups, a mocked Twenty allowing 100 calls a
   minute (429 beyond, like Twenty's default limiter): reactor's `auto_assign` job beside the per-assignment
   counting approach with no client-side limit.

    .venv/bin/python bench/assign.py [--webhooks 200] [--members 5] [--people 1214] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import respx
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, percentile, scratch_database, scratch_redis_url, servers
from reactor import worker as worker_module
from reactor.app import create_app
from reactor.resources import open_resources
from reactor.settings import Settings, load_settings
from reactor.twenty import TaskInput, TwentyClient, TwentyError, create_http_client
from reactor.webhooks import signature

TWENTY = "http://twenty.bench/rest"
SECRET = "bench-secret"


class MockTwenty:
    """People, members, tasks and task targets, answering after `latency_s`; optionally Twenty's default limiter
    (a bucket of `limit` per 60 s, 429 without Retry-After when empty)."""

    def __init__(self, latency_s: float, members: int, limit: int | None = None) -> None:
        self.latency_s = latency_s
        self.limit = limit
        self.tokens = float(limit or 0)
        self.at = time.monotonic()
        self.calls: Counter[str] = Counter()
        self.people: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.linked: dict[str, float] = {}  # person id -> when its task was linked
        self.members = [{"id": f"member-{i}", "userEmail": f"m{i}@acme.test"} for i in range(members)]

    def add_people(self, count: int) -> list[str]:
        ids = [str(uuid.uuid4()) for _ in range(count)]
        for i, person_id in enumerate(ids):
            self.people[person_id] = {"id": person_id, "name": {"firstName": f"P{i}", "lastName": "Bench"},
                                      "emails": {"primaryEmail": f"p{i}@bench.test"}, "deletedAt": None}  # fmt: skip
        return ids

    def _allowed(self) -> bool:
        if self.limit is None:
            return True
        now = time.monotonic()
        self.tokens = min(self.limit, self.tokens + (now - self.at) * self.limit / 60)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(self.latency_s)
        if not self._allowed():
            self.calls["429"] += 1
            return httpx.Response(429, json={"statusCode": 429, "messages": ["Limit reached"]})
        path, method = request.url.path.removeprefix("/rest"), request.method
        self.calls[f"{method} {path.split('/')[1] if path.count('/') else path}"] += 1
        body: Any = json.loads(request.content) if request.content else {}
        if method == "GET" and path.startswith("/people/"):
            return httpx.Response(200, json={"data": {"person": self.people[path.rsplit("/", 1)[1]]}})
        if method == "GET" and path == "/people":
            return self._page("people", list(self.people.values()), request)
        if method == "GET" and path == "/workspaceMembers":
            return self._page("workspaceMembers", self.members, request)
        if method == "GET" and path == "/metadata/objects":
            fields = [{"name": "task"}, {"name": "targetPerson"}]
            return httpx.Response(200, json={"data": {"objects": [{"nameSingular": "taskTarget", "fields": fields}]}})
        if method == "GET" and path == "/tasks":
            wanted = request.url.params.get("filter", "")
            found = [t for t in self.tasks.values() if t["status"] == "TODO" and
                     (f'"{t["assigneeId"]}"' in wanted or "assigneeId" not in wanted)]  # fmt: skip
            return self._page("tasks", found, request)
        if method == "POST" and path in ("/tasks", "/batch/tasks"):
            saved = [self._task(record) for record in (body if isinstance(body, list) else [body])]
            key = "createTasks" if path.startswith("/batch") else "createTask"
            return httpx.Response(201, json={"data": {key: saved if path.startswith("/batch") else saved[0]}})
        if method == "POST" and path in ("/taskTargets", "/batch/taskTargets"):
            records = body if isinstance(body, list) else [body]
            for record in records:
                self.linked.setdefault(record["targetPersonId"], time.perf_counter())
            key = "createTaskTargets" if path.startswith("/batch") else "createTaskTarget"
            saved = [{"id": r.get("id") or str(uuid.uuid4()), **r} for r in records]
            return httpx.Response(201, json={"data": {key: saved if path.startswith("/batch") else saved[0]}})
        return httpx.Response(404, json={"statusCode": 404, "messages": [f"no mock for {method} {path}"]})

    def _task(self, record: dict[str, Any]) -> dict[str, Any]:
        task_id = record.get("id") or str(uuid.uuid4())
        task = {"deletedAt": None, "updatedAt": "2026-11-24T12:00:00.000Z", **record, "id": task_id}
        self.tasks[task_id] = task
        return task

    def _page(self, key: str, items: list[dict[str, Any]], request: httpx.Request) -> httpx.Response:
        limit = int(request.url.params.get("limit", "60"))
        start = int(request.url.params.get("starting_after", "0") or 0)
        page = items[start : start + limit]
        more = start + limit < len(items)
        info = {"hasNextPage": more, "endCursor": str(start + limit) if more else None}
        return httpx.Response(200, json={"data": {key: page}, "totalCount": len(items), "pageInfo": info})


def bench_settings(database_url: str, redis_url: str, rate_limit: int) -> Settings:
    return load_settings(
        None, DATABASE_URL=database_url, REDIS_URL=redis_url, LEAD_API_KEYS="bench:bench", TWENTY_REST_URL=TWENTY,
        TWENTY_REST_TOKEN="bench", TWENTY_WEBHOOK_SECRET=SECRET, TWENTY_RATE_LIMIT=str(rate_limit),
        LOG_LEVEL="WARNING",
    )  # fmt: skip


async def reactor_latency(settings: Settings, webhooks: int, members: int) -> dict[str, Any]:
    mock = MockTwenty(0.02, members)
    people = mock.add_people(webhooks)
    sent: dict[str, float] = {}
    with respx.mock(assert_all_called=False) as router:
        router.route(url__startswith=TWENTY).mock(side_effect=mock)
        async with open_resources(settings) as res, LifespanManager(create_app(settings)) as manager:
            worker = worker_module.build_worker(res)
            running = asyncio.create_task(worker.async_run())
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://r") as app:
                for person_id in people:
                    body = json.dumps({"eventName": "person.created", "webhookId": "w", "record":
                                       mock.people[person_id]}).encode()  # fmt: skip
                    stamp = str(int(time.time() * 1000))
                    headers = {"content-type": "application/json", "x-twenty-webhook-timestamp": stamp,
                               "x-twenty-webhook-nonce": secrets.token_hex(16),
                               "x-twenty-webhook-signature": signature(SECRET, stamp, body)}  # fmt: skip
                    sent[person_id] = time.perf_counter()
                    response = await app.post("/webhooks/twenty", content=body, headers=headers)
                    assert response.status_code == 202, response.text
                    await asyncio.sleep(0.05)  # webhooks arrive spread out, not all at once
                deadline = time.monotonic() + 60
                while len(mock.linked) < webhooks and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a mock
                    await asyncio.sleep(0.05)
            await worker.close()
            running.cancel()
    latencies = sorted(mock.linked[p] - sent[p] for p in people if p in mock.linked)
    per_call = {k: v for k, v in mock.calls.items() if k != "429"}
    return {
        "follow_ups": len(mock.linked),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "twenty_calls": sum(per_call.values()),
        "calls_per_follow_up": round(sum(per_call.values()) / max(len(mock.linked), 1), 2),
        "calls_by_kind": per_call,
    }


async def counting_approach(webhooks: int, members: int, *, limit: int | None = None) -> dict[str, Any]:
    """For every assignment: one `limit=1` list per member to read its open-task count, then create and link."""
    mock = MockTwenty(0.02, members, limit)
    people = mock.add_people(webhooks)
    latencies: list[float] = []
    failed = 0
    with respx.mock(assert_all_called=False) as router:
        router.route(url__startswith=TWENTY).mock(side_effect=mock)
        async with create_http_client(TWENTY, "bench") as http:
            twenty = TwentyClient(http, max_attempts=1)
            for person_id in people:
                started = time.perf_counter()
                try:
                    loads = {}
                    for member in mock.members:
                        open_tasks = f'and(assigneeId[eq]:"{member["id"]}",status[in]:[TODO])'
                        body = await twenty.request("GET", "/tasks", params={"filter": open_tasks, "limit": 1})
                        loads[member["id"]] = body["totalCount"]
                    chosen = min(loads, key=lambda m: loads[m])
                    task = await twenty.create_task(TaskInput(title="Follow-up", status="TODO", assignee_id=chosen))
                    await twenty.request("POST", "/taskTargets", json={"taskId": task.id, "targetPersonId": person_id})
                except TwentyError:
                    failed += 1
                    continue
                latencies.append(time.perf_counter() - started)
    latencies.sort()
    calls = sum(v for k, v in mock.calls.items() if k != "429")
    return {
        "follow_ups": len(latencies),
        "failed": failed,
        "http_429": mock.calls["429"],
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "twenty_calls": calls,
        "calls_per_follow_up": round(calls / max(len(latencies), 1), 2),
    }


async def reactor_backfill(settings: Settings, people: int, members: int, limit: int) -> dict[str, Any]:
    mock = MockTwenty(0.02, members, limit)
    mock.add_people(people)
    with respx.mock(assert_all_called=False) as router:
        router.route(url__startswith=TWENTY).mock(side_effect=mock)
        async with open_resources(settings) as res:
            started = time.perf_counter()
            result = await worker_module.auto_assign({"resources": res, "job_try": 1, "job_id": "bench"})
            elapsed = time.perf_counter() - started
    assigned = Counter(task["assigneeId"] for task in mock.tasks.values())
    return {
        "created": result["created"],
        "failed": result["failed"],
        "tasks_in_twenty": len(mock.tasks),
        "linked_people": len(mock.linked),
        "seconds": round(elapsed, 1),
        "twenty_calls": sum(v for k, v in mock.calls.items() if k != "429"),
        "http_429": mock.calls["429"],
        "calls_by_kind": {k: v for k, v in mock.calls.items() if k != "429"},
        "per_member": sorted(assigned.values()),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "twenty_latency_ms": 20, "members": args.members, "llm": "off"}
    with servers() as (_pg, rd):
        redis_url = scratch_redis_url(rd.url)
        async with scratch_database(_pg.url) as database_url:
            for name, limit in (("latency", 100_000), ("backfill", 100)):
                async with Redis.from_url(redis_url) as redis:
                    await redis.flushdb()
                settings = bench_settings(database_url, redis_url, limit)
                if name == "latency":
                    report["reactor_webhook_to_task"] = await reactor_latency(settings, args.webhooks, args.members)
                    report["count_per_assignment"] = await counting_approach(args.webhooks, args.members)
                else:
                    report["reactor_backfill_100_per_min"] = await reactor_backfill(
                        settings, args.people, args.members, 100
                    )
                    report["count_per_assignment_backfill_100_per_min"] = await counting_approach(
                        args.people, args.members, limit=100
                    )
            async with Redis.from_url(redis_url) as redis:
                await redis.flushdb()
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webhooks", type=int, default=200)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--people", type=int, default=1214)
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(run(arguments)), indent=None if arguments.json else 2))
