"""Reconciliation on the real PostgreSQL and Redis with Twenty mocked: drift injected, repaired and reported;
one run at a time; events during a run survive its swap; a dry run changes nothing."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import respx
from pydantic import SecretStr
from redis.asyncio import Redis

from reactor import assignees, reconcile
from reactor.loadcache import TaskState
from reactor.resources import Resources, open_resources
from reactor.settings import Settings
from reactor.worker import build_worker
from tests.conftest import app_client
from tests.fake_twenty import BASE_URL, FakeTwenty

pytestmark = pytest.mark.anyio


@pytest.fixture
def twenty_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "twenty_rest_url": BASE_URL, "twenty_rest_token": SecretStr("tok"), "twenty_max_attempts": 1,
        "twenty_rate_limit": 100_000,
    })  # fmt: skip


@pytest.fixture
def fake() -> Iterator[FakeTwenty]:
    twenty = FakeTwenty()
    for member in ("m1", "m2", "m3"):
        twenty.add_member(member, f"{member}@acme.test")
    with respx.mock(assert_all_called=False) as router:
        twenty.install(router)
        yield twenty


@pytest.fixture
async def res(twenty_settings: Settings, db: asyncpg.Pool, redis: Redis) -> AsyncIterator[Resources]:
    async with open_resources(twenty_settings) as resources:
        yield resources


async def inject_drift(res: Resources, fake: FakeTwenty, db: asyncpg.Pool) -> dict[str, str]:
    """Twenty's truth: m1 has 3 open tasks, m2 has 1. The cache missed events; a lead never synced; a person
    created since the install lost its person.created; a follow-up's task was deleted in Twenty without a webhook;
    a rep completed another; and the workspace has historical contacts."""
    for i in range(3):
        fake.add_task(f"a{i}", "m1")
    fake.add_task("b0", "m2")
    fake.add_webhook(created_at="2026-11-20T00:00:00.000Z")
    await res.cache.set_members({"m1": 1.0, "m2": 1.0, "m3": 1.0})
    await res.cache.apply(TaskState("a0", "m1", "TODO", 1000))  # a1, a2 created while the webhook was down
    await res.cache.apply(TaskState("gone", "m3", "TODO", 1000))  # its DONE event was lost
    await res.cache.apply(TaskState("gone2", "m3", "TODO", 1000))
    historical = [fake.add_person(f"old{i}@example.com", first=f"Old{i}") for i in range(5)]
    late = fake.add_person("late@example.com", first="Late", created_at="2026-11-25T08:00:00.000Z")
    await db.execute("INSERT INTO leads (lead_id, email, first_name, api_source) "
                     "VALUES ('never', 'never@example.com', 'Nev', 't')")  # fmt: skip
    owner = fake.add_person("owner@example.com", first="Owner", created_at="2026-11-26T08:00:00.000Z")
    await db.execute("INSERT INTO follow_ups (person_id, task_id, target_id, state, opened_at) "
                     "VALUES ($1, 'deleted-task', 'dt', 'open', now())", owner)  # fmt: skip
    finished = fake.add_person("finished@example.com", first="Fin", created_at="2026-11-26T09:00:00.000Z")
    await db.execute("INSERT INTO follow_ups (person_id, task_id, target_id, state, opened_at, closed_at) "
                     "VALUES ($1, 'done-task', 'dn', 'closed', now(), now())", finished)  # fmt: skip
    return {"late": late, "owner": owner, "finished": finished, **{f"old{i}": p for i, p in enumerate(historical)}}


async def loads(res: Resources) -> dict[str, int]:
    return await assignees.member_loads(res.db, res.cache, res.settings)


async def test_drift_is_repaired_and_reported(res: Resources, fake: FakeTwenty, db: asyncpg.Pool) -> None:
    people = await inject_drift(res, fake, db)

    report = await reconcile.run(res, "run-1")

    assert report.drift == {"m1": {"cached": 1, "true": 3}, "m2": {"cached": 0, "true": 1},
                            "m3": {"cached": 2, "true": 0}}  # fmt: skip
    assert (report.tasks_unknown_to_cache, report.open_tasks) == (3, 4)
    assert (report.leads_unsynced, report.leads_synced) == (1, 1)
    assert await db.fetchval("SELECT crm_synced FROM leads WHERE lead_id = 'never'") is True
    assert report.follow_ups_closed == 1
    assert await db.fetchval("SELECT state FROM follow_ups WHERE task_id = 'deleted-task'") == "closed"
    # Owed only where a trigger was lost (the late person); the lead's sync owed its person's, as it always does.
    assert (report.people_without_follow_up, report.follow_ups_created) == (1, 2)
    never = await db.fetchval("SELECT crm_person_id FROM leads WHERE lead_id = 'never'")
    opened = {r["person_id"] for r in await db.fetch("SELECT person_id FROM follow_ups WHERE state = 'open'")}
    assert opened == {people["late"], never}
    # The loads now match Twenty, new follow-ups included.
    truth = Counter(t["assigneeId"] for t in fake.tasks.values() if t["status"] == "TODO" and not t["deletedAt"])
    assert await loads(res) == dict(truth)

    again = await reconcile.run(res, "run-2")  # nothing left to fix, and nothing re-created
    assert again.drift == {}
    assert (again.leads_synced, again.follow_ups_created, again.follow_ups_closed) == (0, 0, 0)


async def test_done_deleted_and_historical_people_get_no_follow_up_however_often_it_runs(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    people = await inject_drift(res, fake, db)
    for run in range(3):  # e.g. nightly with RECONCILE_CRON
        await reconcile.run(res, f"night-{run}")
    rows = Counter(r["person_id"] for r in await db.fetch("SELECT person_id FROM follow_ups"))
    assert rows[people["owner"]] == rows[people["finished"]] == 1  # deleted and done: stay done
    assert all(rows[people[f"old{i}"]] == 0 for i in range(5))  # historical contacts: left alone
    assert rows[people["late"]] == 1  # the lost person.created: repaired once
    assert len(fake.tasks) == 4 + 2


async def test_a_dry_run_changes_nothing(res: Resources, fake: FakeTwenty, db: asyncpg.Pool) -> None:
    await inject_drift(res, fake, db)
    loads_before = await loads(res)
    tasks_before = dict(fake.tasks)

    report = await reconcile.run(res, "dry", dry_run=True)

    assert report.dry_run is True
    assert report.drift["m1"] == {"cached": 1, "true": 3}
    assert (report.leads_unsynced, report.leads_synced, report.follow_ups_created) == (1, 0, 0)
    assert report.people_without_follow_up == 1  # the late person; the unsynced lead's is not in Twenty yet
    assert report.follow_ups_closed == 1
    assert await loads(res) == loads_before
    assert fake.tasks == tasks_before
    assert await db.fetchval("SELECT crm_synced FROM leads WHERE lead_id = 'never'") is False
    assert await db.fetchval("SELECT state FROM follow_ups WHERE task_id = 'deleted-task'") == "open"
    assert await db.fetchval("SELECT count(*) FROM follow_ups") == 2


async def test_task_events_during_a_run_survive_the_swap(res: Resources, fake: FakeTwenty) -> None:
    for i in range(450):  # three pages
        fake.add_task(f"t{i:03}", "m1")
    await res.cache.set_members({"m1": 1.0, "m2": 1.0, "m3": 1.0})
    applied: list[asyncio.Task[bool]] = []

    def during_the_scan(page: int) -> None:
        if page == 2:  # after page 1 was listed: t000 moves to m2, and a new task appears for m3
            fake.tasks["t000"]["assigneeId"] = "m2"
            fake.add_task("new", "m3")
            version = 2_000_000_000_000  # newer than the listing
            applied.append(asyncio.ensure_future(res.cache.apply(TaskState("t000", "m2", "TODO", version))))
            applied.append(asyncio.ensure_future(res.cache.apply(TaskState("new", "m3", "TODO", version))))

    fake.on_task_page = during_the_scan
    report = await reconcile.run(res, "live")

    assert all(await asyncio.gather(*applied))
    assert await loads(res) == {"m1": 449, "m2": 1, "m3": 1}
    assert report.events_during_run == 2


async def test_ten_thousand_open_tasks_take_fifty_list_calls(res: Resources, fake: FakeTwenty) -> None:
    for i in range(10_000):
        fake.add_task(f"t{i}", f"member-{i % 100}")
    report = await reconcile.run(res, "big", dry_run=True)
    assert report.open_tasks == 10_000
    assert fake.calls["list_tasks"] <= 10_000 // 200 + 1 + 1  # the scan, plus the (empty) follow-up check
    assert len(report.loads) == 100


async def test_check_compares_loads_in_one_call(res: Resources, fake: FakeTwenty) -> None:
    fake.add_task("a", "m1")
    fake.add_task("b", "m1")
    await res.cache.apply(TaskState("a", "m1", "TODO", 1))
    loads = await reconcile.check(res)
    assert loads == {"m1": {"cached": 1, "true": 2}}
    assert fake.calls["group_by"] == 1
    assert sum(fake.calls.values()) == 1


async def test_one_reconcile_at_a_time_over_http(
    twenty_settings: Settings, res: Resources, fake: FakeTwenty, redis: Redis
) -> None:
    fake.add_task("a", "m1")
    async with app_client(twenty_settings) as api:
        first = await api.post("/reconcile")
        second = await api.post("/reconcile")
        assert first.status_code == 202
        assert (second.status_code, second.json()) == (200, {"job_id": first.json()["job_id"],
                                                             "status": "already_running"})  # fmt: skip
        await build_worker(res, burst=True, background=False).main()
        done = (await api.get(f"/reconcile/{first.json()['job_id']}")).json()
        assert done["status"] == "complete"
        assert done["progress"] == {"step": "done", "done": 1, "total": 1}
        assert done["summary"]["open_tasks"] == 1
        assert (await api.post("/reconcile")).status_code == 202  # the lock was released
        assert (await api.get("/reconcile/nope")).status_code == 404


async def test_a_held_lock_refuses_the_job_and_the_cli_path(res: Resources, redis: Redis) -> None:
    assert await reconcile.acquire(redis, "someone") is None
    assert await reconcile.acquire(redis, "me") == "someone"
    await reconcile.release(redis, "me")  # not mine: nothing happens
    assert await reconcile.acquire(redis, "me") == "someone"
    await reconcile.release(redis, "someone")
    assert await reconcile.acquire(redis, "me") is None
    assert 0 < await redis.ttl(reconcile.LOCK_KEY) <= reconcile.LOCK_TTL_S


def test_cron_expressions() -> None:
    assert reconcile.parse_cron("15 3 * * 1-5") == {"minute": {15}, "hour": {3}, "day": None, "month": None,
                                                   "weekday": {0, 1, 2, 3, 4}}  # fmt: skip
    assert reconcile.parse_cron("*/20 * * * 0")["minute"] == {0, 20, 40}
    assert reconcile.parse_cron("0 0 * * 0")["weekday"] == {6}  # cron's Sunday is Python's 6
    with pytest.raises(ValueError, match="five fields"):
        reconcile.parse_cron("daily")
    with pytest.raises(ValueError, match="outside"):
        reconcile.parse_cron("61 * * * *")
