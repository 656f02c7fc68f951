"""Follow-up tasks end to end on the real PostgreSQL and Redis, Twenty and Ollama mocked through respx."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
import respx
from pydantic import SecretStr
from redis.asyncio import Redis

from reactor import followups, jobs
from reactor.followups import FollowUpDeps
from reactor.resources import Resources, open_resources
from reactor.settings import Settings
from reactor.worker import build_worker
from tests.conftest import app_client
from tests.fake_twenty import BASE_URL, FakeTwenty, unavailable

pytestmark = pytest.mark.anyio

OLLAMA = "http://ollama.test"
MEMBERS = {"m1": "ann@acme.test", "m2": "bob@acme.test", "m3": "cy@acme.test"}


@pytest.fixture
def twenty_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "twenty_rest_url": BASE_URL, "twenty_rest_token": SecretStr("tok"), "sync_max_tries": 2,
        "sync_retry_base_s": 0.01, "twenty_max_attempts": 1, "twenty_rate_limit": 100_000, "ollama_url": OLLAMA,
    })  # fmt: skip


@pytest.fixture
def fake() -> Iterator[FakeTwenty]:
    twenty = FakeTwenty()
    for member_id, email in MEMBERS.items():
        twenty.add_member(member_id, email)
    with respx.mock(assert_all_called=False) as router:
        twenty.install(router)
        yield twenty


@pytest.fixture
async def res(twenty_settings: Settings, db: asyncpg.Pool, redis: Redis) -> AsyncIterator[Resources]:
    async with open_resources(twenty_settings) as resources:
        yield resources


def deps_of(res: Resources, **settings: object) -> FollowUpDeps:
    deps = res.follow_up_deps()
    if settings:
        deps = dataclasses.replace(deps, settings=deps.settings.model_copy(update=settings))
    return deps


async def test_a_follow_up_is_created_assigned_and_linked(res: Resources, fake: FakeTwenty, db: asyncpg.Pool) -> None:
    fake.add_task("busy1", "m1")
    fake.add_task("busy2", "m2")
    person_id = fake.add_person("ada@example.com", first="Ada", last="Lovelace")

    outcome = await followups.create_follow_up(deps_of(res), person_id)

    assert (outcome.status, outcome.assignee_id, outcome.llm_used) == ("created", "m3", False)
    task = fake.tasks[outcome.task_id or ""]
    assert task["title"] == "📞 Sales Follow-up — Ada Lovelace"
    assert (task["status"], task["assigneeId"]) == ("TODO", "m3")
    assert "### Next steps" in task["bodyV2"]["markdown"]  # the template: the LLM is off
    due = dt.datetime.fromisoformat(task["dueAt"])
    assert abs((due - dt.datetime.now(dt.UTC)).total_seconds() - 24 * 3600) < 60
    [target] = fake.task_targets.values()
    assert (target["taskId"], target["targetPersonId"]) == (outcome.task_id, person_id)
    row = await db.fetchrow("SELECT * FROM follow_ups WHERE person_id = $1", person_id)
    assert (row["state"], row["assignee_id"], row["llm_used"]) == ("open", "m3", False)
    assert (await res.cache.loads())["m3"] == 1  # the reservation became the task, counted once


async def test_duplicate_triggers_at_once_make_one_follow_up(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    person_id = fake.add_person("grace@example.com", first="Grace")
    outcomes = await asyncio.gather(*(followups.create_follow_up(deps_of(res), person_id) for _ in range(10)))
    assert Counter(o.status for o in outcomes) == {"created": 1, "exists": 9}
    assert len(fake.tasks) == 1
    assert await db.fetchval("SELECT count(*) FROM follow_ups WHERE person_id = $1", person_id) == 1
    assert sum((await res.cache.loads()).values()) == 1


async def test_a_worker_dying_after_twenty_created_the_task_makes_no_second_task(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    person_id = fake.add_person("linus@example.com", first="Linus")
    fake.reject_tasks = False
    # The first attempt took the slot and Twenty created the task; the worker died before recording it.
    await db.execute(
        "INSERT INTO follow_ups (person_id, task_id, target_id, created_at) VALUES ($1, 't-1', 'tt-1', now() - "
        "interval '1 hour')",
        person_id,
    )
    fake.add_task("t-1", "m1")

    outcome = await followups.create_follow_up(deps_of(res), person_id)

    assert (outcome.status, outcome.task_id) == ("created", "t-1")  # resumed: the same task, upserted
    assert list(fake.tasks) == ["t-1"]
    assert await db.fetchval("SELECT state FROM follow_ups WHERE task_id = 't-1'") == "open"


async def test_a_returning_lead_whose_follow_up_is_done_gets_a_new_one(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    person_id = fake.add_person("ret@example.com", first="Ret")
    first = await followups.create_follow_up(deps_of(res), person_id)
    assert first.task_id is not None
    await db.execute("UPDATE follow_ups SET opened_at = now() - interval '1 day'")
    assert (await followups.create_follow_up(deps_of(res), person_id)).status == "exists"  # still open in Twenty

    fake.tasks[first.task_id]["status"] = "DONE"  # its task.updated webhook was lost
    again = await followups.create_follow_up(deps_of(res), person_id)

    assert again.status == "created"
    assert again.task_id != first.task_id
    states = await db.fetch("SELECT task_id, state FROM follow_ups ORDER BY id")
    assert [(r["task_id"], r["state"]) for r in states] == [(first.task_id, "closed"), (again.task_id, "open")]


async def test_a_rejected_creation_releases_the_reservation(res: Resources, fake: FakeTwenty, db: asyncpg.Pool) -> None:
    person_id = fake.add_person("rej@example.com")
    fake.reject_tasks = True
    outcome = await followups.create_follow_up(deps_of(res), person_id)
    assert outcome.status == "failed"
    assert "Invalid assignee" in (outcome.error or "")
    assert await res.cache.loads() == {}
    assert await db.fetchval("SELECT state FROM follow_ups") == "failed"

    fake.reject_tasks = False  # the slot is free again
    assert (await followups.create_follow_up(deps_of(res), person_id)).status == "created"


async def test_twenty_unavailable_keeps_the_slot_for_the_retry(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    person_id = fake.add_person("flaky@example.com")
    fake.fail_next = [unavailable(503)]
    with pytest.raises(Exception, match="503"):
        await followups.create_follow_up(deps_of(res), person_id)
    [reserved] = (await res.cache.loads()).items()  # the reservation waits for the retry, for the same member
    row = await db.fetchrow("SELECT state, last_error, task_id, created_at FROM follow_ups")
    assert row["state"] == "pending"
    assert "503" in row["last_error"]

    await db.execute("UPDATE follow_ups SET created_at = now() - interval '1 hour'")  # the retry comes later
    retried = await followups.create_follow_up(deps_of(res), person_id)
    assert (retried.status, retried.task_id, retried.assignee_id) == ("created", row["task_id"], reserved[0])
    assert await res.cache.loads() == {reserved[0]: 1}  # counted once


async def test_the_llm_writes_the_body_when_enabled(res: Resources, fake: FakeTwenty) -> None:
    person_id = fake.add_person("llm@example.com", first="Lee")
    answer = "## Call Lee today\n\n**Budget:** unknown\n\n### Next steps\n- [ ] Call\n- [ ] Qualify the budget"
    route = fake.router.post(f"{OLLAMA}/api/generate").mock(return_value=httpx.Response(200, json={"response": answer}))
    outcome = await followups.create_follow_up(deps_of(res, enable_llm_copywriting=True), person_id)
    assert outcome.llm_used is True
    assert fake.tasks[outcome.task_id or ""]["bodyV2"]["markdown"] == answer
    assert json.loads(route.calls.last.request.content)["model"] == "llama3.1:8b"


async def test_a_backfill_goes_through_the_batch_endpoints(res: Resources, fake: FakeTwenty, db: asyncpg.Pool) -> None:
    people = [fake.add_person(f"p{i}@example.com", first=f"P{i}") for i in range(130)]
    twenty = res.twenty
    assert twenty is not None
    persons = [await twenty.get_person(p) for p in people]
    fake.calls.clear()

    outcome = await followups.create_follow_ups(deps_of(res), [p for p in persons if p is not None])

    assert (len(outcome.created), len(outcome.failed)) == (130, 0)
    assert fake.calls["batch_tasks"] == 3
    assert fake.calls["batch_targets"] == 3
    assert fake.calls["create_task"] == 0
    assert Counter(t["assigneeId"] for t in fake.tasks.values()) == {"m1": 44, "m2": 43, "m3": 43}
    assert len(fake.task_targets) == 130
    again = await followups.create_follow_ups(deps_of(res), [p for p in persons if p is not None])
    assert (len(again.created), again.skipped) == (0, 130)


async def test_a_posted_lead_ends_with_an_assigned_follow_up(
    twenty_settings: Settings, res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    async with app_client(twenty_settings) as api:
        response = await api.post("/leads", json={"first_name": "Alan", "last_name": "Turing",
                                                  "email": "alan@example.com"})  # fmt: skip
        assert response.status_code == 201
        await build_worker(res, burst=True, sweep=False).main()
        [person] = fake.people.values()
        [task] = fake.tasks.values()
        assert task["title"] == "📞 Sales Follow-up — Alan Turing"
        assert task["assigneeId"] in MEMBERS
        [target] = fake.task_targets.values()
        assert target["targetPersonId"] == person["id"]
        shown = (await api.get(f"/leads/{response.json()['lead_id']}")).json()["follow_up"]
        assert (shown["task_id"], shown["assignee_id"], shown["state"]) == (task["id"], task["assigneeId"], "open")

        accepted = await api.post("/tasks/auto-assign")
        assert accepted.status_code == 202
        await build_worker(res, burst=True, sweep=False).main()
        result = (await api.get(f"/jobs/{accepted.json()['job_id']}")).json()["result"]
        assert (result["created"], result["failed"]) == (0, 0)  # Alan already has an open follow-up
    assert len(fake.tasks) == 1
    assert jobs.follow_up_job_id(person["id"]) == f"follow_up:{person['id']}"


async def test_a_person_created_webhook_ends_as_one_task_without_reading_the_person(
    twenty_settings: Settings, res: Resources, fake: FakeTwenty
) -> None:
    from tests.test_webhooks import signed

    person_id = fake.add_person("web@example.com", first="Web", last="Hook")
    body = json.dumps({"eventName": "person.created", "webhookId": "w1", "record": fake.people[person_id]})
    hooked = twenty_settings.model_copy(update={"twenty_webhook_secret": SecretStr("local-test-secret")})
    async with app_client(hooked) as api:
        for _ in range(3):  # Twenty's duplicates, re-sent with new nonces
            response = await api.post("/webhooks/twenty", content=body, headers=signed(body))
            assert response.status_code in (200, 202)
    await build_worker(res, burst=True, sweep=False).main()

    [task] = fake.tasks.values()
    assert task["title"] == "📞 Sales Follow-up — Web Hook"
    assert fake.calls["get_person"] == 0  # the webhook's record was enough
    assert [t["targetPersonId"] for t in fake.task_targets.values()] == [person_id]


async def test_a_returning_lead_gets_a_new_follow_up_once_the_last_is_done(
    twenty_settings: Settings, res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    lead = {"first_name": "Rita", "email": "rita@example.com"}
    async with app_client(twenty_settings) as api:
        assert (await api.post("/leads", json=lead)).status_code == 201
        await build_worker(res, burst=True, sweep=False).main()
        [first] = fake.tasks.values()
        await api.post("/leads", json=lead)  # back again while the follow-up is open: nothing new
        await asyncio.sleep(0.05)
        await build_worker(res, burst=True, sweep=False).main()
        assert len(fake.tasks) == 1

        first["status"] = "DONE"  # done in Twenty; its webhook never came
        await db.execute("UPDATE follow_ups SET opened_at = now() - interval '1 hour'")
        # arq keeps each job's result for 10 s, refusing the same job id meanwhile; the lead comes back later.
        lead_id, person_id = await db.fetchrow("SELECT lead_id, crm_person_id FROM leads")
        await res.redis.delete(f"arq:result:sync:{lead_id}", f"arq:result:follow_up:{person_id}")
        assert (await api.post("/leads", json=lead)).json()["status"] == "existing"
        await build_worker(res, burst=True, sweep=False).main()
    assert len(fake.tasks) == 2
    assert await db.fetchval("SELECT count(*) FROM follow_ups WHERE state = 'open'") == 1


async def test_auto_assign_finishes_follow_ups_left_pending(res: Resources, fake: FakeTwenty, db: asyncpg.Pool) -> None:
    from reactor.worker import auto_assign

    stuck = fake.add_person("stuck@example.com", first="Stuck")
    fresh = fake.add_person("fresh@example.com", first="Fresh")
    await db.execute(
        "INSERT INTO follow_ups (person_id, task_id, target_id, created_at) "
        "VALUES ($1, 't-stuck', 'tt-stuck', now() - interval '1 hour')",
        stuck,
    )
    result = await auto_assign({"resources": res, "job_try": 1, "job_id": "auto_assign:test"})
    assert (result["created"], result["failed"]) == (2, 0)
    assert set(fake.tasks) >= {"t-stuck"}
    assert len(fake.tasks) == 2
    states = dict(await db.fetch("SELECT person_id, state FROM follow_ups"))
    assert states == {stuck: "open", fresh: "open"}
