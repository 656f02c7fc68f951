"""Follow-ups as rows drained in batches, on the real PostgreSQL and Redis, Twenty and Ollama through respx."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import anyio
import asyncpg
import httpx
import pytest
import respx
from pydantic import SecretStr
from redis.asyncio import Redis

from reactor import drain, events, followup_store, followups
from reactor.resources import Resources, open_resources
from reactor.settings import Settings
from reactor.webhooks import Event
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


def with_settings(res: Resources, **changes: object) -> Resources:
    return dataclasses.replace(res, settings=res.settings.model_copy(update=changes))


async def owe(res: Resources, fake: FakeTwenty, *person_ids: str, with_record: bool = True) -> None:
    from reactor.twenty import Person

    people = {p: Person.model_validate(fake.people[p]) if with_record else None for p in person_ids}
    await followups.owe(res.db, people, trigger="test")


def task_event(task: dict[str, object], action: str = "updated") -> Event:
    return Event(name=f"task.{action}", webhook_id="w1", record=dict(task), updated_fields=())


async def ready(res: Resources) -> None:
    """What a worker does at start-up: the members read and the loads counted."""
    from reactor import assignees

    assert res.twenty is not None
    await assignees.ensure_ready(res.twenty, res.cache, res.db, res.settings)


async def loads(res: Resources) -> dict[str, int]:
    from reactor import assignees

    return await assignees.member_loads(res.db, res.cache, res.settings)


async def test_a_follow_up_is_created_assigned_and_linked_in_two_calls(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    fake.add_task("busy1", "m1")
    fake.add_task("busy2", "m2")
    person_id = fake.add_person("ada@example.com", first="Ada", last="Lovelace")
    await owe(res, fake, person_id)
    await drain.until_idle(res)  # first round also reads members and counts the loads
    fake.calls.clear()

    other = fake.add_person("bo@example.com", first="Bo")
    await owe(res, fake, other)
    await drain.until_idle(res)
    assert (fake.calls["batch_tasks"], fake.calls["batch_targets"]) == (1, 1)
    assert sum(fake.calls.values()) == 2  # no person read: the record came with the trigger

    row = await db.fetchrow("SELECT * FROM follow_ups WHERE person_id = $1", person_id)
    assert (row["state"], row["assignee_id"], row["llm_used"]) == ("open", "m3", False)
    task = fake.tasks[row["task_id"]]
    assert task["title"] == "📞 Sales Follow-up — Ada Lovelace"
    assert (task["status"], task["assigneeId"]) == ("TODO", "m3")
    assert "### Next steps" in task["bodyV2"]["markdown"]  # the template: the LLM is off
    due = dt.datetime.fromisoformat(task["dueAt"])
    assert abs((due - dt.datetime.now(dt.UTC)).total_seconds() - 24 * 3600) < 60
    assert {(t["taskId"], t["targetPersonId"]) for t in fake.task_targets.values()} >= {(row["task_id"], person_id)}
    assert await loads(res) == {"m1": 2, "m2": 1, "m3": 1}  # busy1 + Bo's (tie to the least recent), busy2, Ada's


async def test_duplicate_triggers_at_once_owe_one_follow_up(res: Resources, fake: FakeTwenty, db: asyncpg.Pool) -> None:
    person_id = fake.add_person("grace@example.com", first="Grace")
    await asyncio.gather(*(owe(res, fake, person_id) for _ in range(10)))
    await asyncio.gather(*(drain.until_idle(res) for _ in range(3)))  # three loops at once
    assert len(fake.tasks) == 1
    assert await db.fetchval("SELECT count(*) FROM follow_ups WHERE person_id = $1", person_id) == 1
    assert sum((await loads(res)).values()) == 1


async def test_a_people_look_up_is_one_call_for_the_batch(res: Resources, fake: FakeTwenty) -> None:
    people = [fake.add_person(f"p{i}@example.com", first=f"P{i}") for i in range(30)]
    await owe(res, fake, *people, with_record=False)  # e.g. reconcile: only ids are known
    await drain.until_idle(res)
    assert fake.calls["get_person"] == 0
    assert fake.calls["list"] == 1  # id[in] for all 30
    assert len(fake.task_targets) == 30


async def test_our_own_task_created_event_before_the_answer_is_counted_once(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    """Twenty sends task.created for reactor's own task before reactor has recorded the creation (50 of 50 on a
    real server): the row already counts the task, so the event must not count it again."""
    from reactor import assignees

    person_id = fake.add_person("early@example.com", first="Early")
    await ready(res)
    await owe(res, fake, person_id)
    [row] = await db.fetch("SELECT * FROM follow_ups")
    picked = await assignees.assign(res.cache, res.db, res.settings, [dict(row)])  # the reservation
    member = picked.members[row["id"]]
    early = {"id": row["task_id"], "status": "TODO", "assigneeId": member, "updatedAt": "2026-11-24T11:59:59.000Z"}
    assert await events.handle(task_event(early, "created"), db=res.db, cache=res.cache) == "follow_up_pending"
    assert await loads(res) == {member: 1}

    fake.fail_targets_next.append(unavailable())  # the round stops after the tasks exist: linked later
    await drain.until_idle(res)
    assert await db.fetchval("SELECT state FROM follow_ups") == "created"
    assert await loads(res) == {member: 1}
    await db.execute("UPDATE follow_ups SET claimed_until = NULL")
    await drain.until_idle(res)
    assert await db.fetchval("SELECT state FROM follow_ups") == "open"
    assert sum((await loads(res)).values()) == 1


async def test_fifty_follow_ups_with_duplicated_and_reordered_events_balance_within_one(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    for extra in ("m4", "m5"):
        fake.add_member(extra, f"{extra}@acme.test")
    people = [fake.add_person(f"b{i}@example.com", first=f"B{i}") for i in range(50)]
    for chunk in range(0, 50, 7):  # a burst arriving in pieces, drained by two loops
        await owe(res, fake, *people[chunk : chunk + 7])
        await asyncio.gather(drain.until_idle(res), drain.until_idle(res))
        deliveries = [task_event(t, "created") for t in fake.tasks.values()] * 2  # every event twice
        random.Random(chunk).shuffle(deliveries)
        for event in deliveries:
            await events.handle(event, db=res.db, cache=res.cache)
    counted = await loads(res)
    assert sum(counted.values()) == 50
    assert max(counted.values()) - min(counted.values()) <= 1, counted
    assert Counter(t["assigneeId"] for t in fake.tasks.values()) == Counter(counted)


async def test_a_stale_done_after_a_reopen_changes_nothing(res: Resources, fake: FakeTwenty, db: asyncpg.Pool) -> None:
    person_id = fake.add_person("re@example.com", first="Re")
    await owe(res, fake, person_id)
    await drain.until_idle(res)
    [task] = fake.tasks.values()
    done = task | {"status": "DONE", "updatedAt": "2026-11-24T13:00:00.000Z"}
    reopened = task | {"status": "TODO", "updatedAt": "2026-11-24T13:05:00.000Z"}
    assert await events.handle(task_event(done), db=res.db, cache=res.cache) == "follow_up_closed"
    assert await events.handle(task_event(reopened), db=res.db, cache=res.cache) == "follow_up_open"
    assert await events.handle(task_event(done), db=res.db, cache=res.cache) == "stale"  # late duplicate
    assert await db.fetchval("SELECT state FROM follow_ups") == "open"
    await owe(res, fake, person_id)  # a new trigger: the reopened one still covers the person
    assert await db.fetchval("SELECT count(*) FROM follow_ups WHERE state IN ('pending', 'created', 'open')") == 1
    assert sum((await loads(res)).values()) == 1


async def test_a_rep_moving_the_task_moves_the_load(res: Resources, fake: FakeTwenty) -> None:
    person_id = fake.add_person("mv@example.com", first="Mv")
    await owe(res, fake, person_id)
    await drain.until_idle(res)
    [task] = fake.tasks.values()
    first = task["assigneeId"]
    other = next(m for m in MEMBERS if m != first)
    moved = task | {"assigneeId": other, "updatedAt": "2026-11-24T13:00:00.000Z"}
    await events.handle(task_event(moved), db=res.db, cache=res.cache)
    assert await loads(res) == {other: 1}


async def test_a_resume_keeps_its_assignee_and_its_task_id(res: Resources, fake: FakeTwenty, db: asyncpg.Pool) -> None:
    person_id = fake.add_person("linus@example.com", first="Linus")
    await owe(res, fake, person_id)
    fake.fail_next.append(unavailable())
    [result] = await drain.until_idle(res)
    assert result.unavailable is not None
    row = await db.fetchrow("SELECT * FROM follow_ups")
    assert (row["state"], row["attempts"]) == ("pending", 1)
    reserved = row["assignee_id"]
    assert reserved is not None
    assert await loads(res) == {reserved: 1}
    for i in range(3):  # meanwhile the reserved member got busy elsewhere
        fake.add_task(f"busy{i}", reserved)
        await events.handle(task_event(fake.tasks[f"busy{i}"], "created"), db=res.db, cache=res.cache)
    await db.execute("UPDATE follow_ups SET claimed_until = NULL")  # its back-off is over
    await drain.until_idle(res)
    after = await db.fetchrow("SELECT * FROM follow_ups")
    assert (after["state"], after["assignee_id"], after["task_id"]) == ("open", reserved, row["task_id"])
    assert list(fake.tasks).count(row["task_id"]) == 1
    assert fake.tasks[row["task_id"]]["assigneeId"] == reserved


async def test_a_killed_loops_rows_are_taken_again_when_its_lease_runs_out(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    person_id = fake.add_person("dead@example.com", first="Dead")
    await owe(res, fake, person_id)
    async with res.db.acquire() as conn:
        taken = await followup_store.claim(conn, limit=10, lease_s=0.3)  # then the worker is SIGKILLed
        assert len(taken) == 1
        assert await followup_store.claim(conn, limit=10, lease_s=30) == []  # leased
    with anyio.fail_after(10):
        while not await db.fetchval("SELECT claimed_until < now() FROM follow_ups"):  # noqa: ASYNC110 (a row, not an event)
            await asyncio.sleep(0.05)
    await drain.until_idle(res)
    assert await db.fetchval("SELECT state FROM follow_ups") == "open"
    assert len(fake.tasks) == 1


async def test_nobody_available_waits_without_a_call(res: Resources, fake: FakeTwenty, db: asyncpg.Pool) -> None:
    person_id = fake.add_person("later@example.com", first="Later")
    await ready(res)
    for member in MEMBERS:
        await db.execute("INSERT INTO member_availability (member_id, away) VALUES ($1, true)", member)
    fake.calls.clear()
    await owe(res, fake, person_id, with_record=False)
    await drain.until_idle(res)
    assert sum(fake.calls.values()) == 0  # availability is decided before anything is fetched
    row = await db.fetchrow("SELECT * FROM follow_ups")
    assert (row["state"], row["assignee_id"]) == ("pending", None)
    assert row["wait_until"] > dt.datetime.now(dt.UTC)


async def test_a_refused_record_is_found_by_splitting_and_the_rest_go_through(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    people = [fake.add_person(f"s{i}@example.com", first=f"S{i}") for i in range(8)]
    await owe(res, fake, *people)
    bad = await db.fetchval("SELECT task_id FROM follow_ups WHERE person_id = $1", people[5])
    fake.reject_task_ids.add(bad)
    await drain.until_idle(res)
    states = dict(await db.fetch("SELECT person_id, state FROM follow_ups"))
    assert states.pop(people[5]) == "failed"
    assert set(states.values()) == {"open"}
    assert bad not in fake.tasks
    assert len(fake.tasks) == 7
    assert await db.fetchval("SELECT count(*) FROM failed_jobs WHERE job_name = 'create_follow_up'") == 1


async def test_a_link_refused_for_good_leaves_no_orphan_task(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    person_id = fake.add_person("orphan@example.com", first="Orphan")
    await owe(res, fake, person_id)
    fake.task_target_field = "somethingElse"  # every link is refused
    await drain.until_idle(res)
    row = await db.fetchrow("SELECT * FROM follow_ups")
    assert row["state"] == "failed"
    assert fake.tasks[row["task_id"]]["deletedAt"] is not None  # the unlinked task went to the trash
    assert await loads(res) == {}


async def test_the_llm_writes_the_body_when_enabled(res: Resources, fake: FakeTwenty) -> None:
    person_id = fake.add_person("llm@example.com", first="Lee")
    answer = "## Call Lee today\n\n**Budget:** unknown\n\n### Next steps\n- [ ] Call\n- [ ] Qualify the budget"
    route = fake.router.post(f"{OLLAMA}/api/generate").mock(return_value=httpx.Response(200, json={"response": answer}))
    await owe(res, fake, person_id)
    await drain.until_idle(with_settings(res, enable_llm_copywriting=True))
    [task] = fake.tasks.values()
    assert task["bodyV2"]["markdown"] == answer
    assert json.loads(route.calls.last.request.content)["model"] == "llama3.1:8b"


async def test_a_posted_lead_ends_with_an_assigned_follow_up(
    twenty_settings: Settings, res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    async with app_client(twenty_settings) as api:
        response = await api.post("/leads", json={"first_name": "Alan", "last_name": "Turing",
                                                  "email": "alan@example.com"})  # fmt: skip
        assert response.status_code == 201
        await drain.until_idle(res)
        [person] = fake.people.values()
        [task] = fake.tasks.values()
        assert task["title"] == "📞 Sales Follow-up — Alan Turing"
        assert task["assigneeId"] in MEMBERS
        [target] = fake.task_targets.values()
        assert target["targetPersonId"] == person["id"]
        shown = (await api.get(f"/leads/{response.json()['lead_id']}")).json()["follow_up"]
        assert (shown["task_id"], shown["assignee_id"], shown["state"]) == (task["id"], task["assigneeId"], "open")
    assert fake.calls["get_person"] == 0


async def test_each_follow_up_is_written_from_its_own_leads_details(
    twenty_settings: Settings, res: Resources, fake: FakeTwenty
) -> None:
    route = fake.router.post(f"{OLLAMA}/api/generate").mock(
        return_value=httpx.Response(200, json={"response": "## Call them\n\n### Next steps\n- [ ] Call"})
    )
    employers = {f"Ctxname{i}": f"Employer Number {i}" for i in range(3)}
    async with app_client(twenty_settings) as api:
        for name, employer in employers.items():
            answer = await api.post("/leads", json={"first_name": name, "email": f"{name}@example.com",
                                                    "employment": {"employer": employer}})  # fmt: skip
            assert answer.status_code == 201, answer.text
    await drain.until_idle(with_settings(res, enable_llm_copywriting=True))  # one batch: one look-up of the leads
    prompts = [json.loads(call.request.content)["prompt"] for call in route.calls]
    assert len(prompts) == 3
    for name, employer in employers.items():
        [prompt] = [p for p in prompts if name in p]
        assert employer in prompt
        assert [e for e in employers.values() if e in prompt] == [employer]


async def test_auto_assign_covers_everyone_without_an_open_follow_up(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    from reactor.worker import auto_assign

    historical = fake.add_person("old@example.com", first="Old")
    done = fake.add_person("done@example.com", first="Done")
    await owe(res, fake, done)
    await drain.until_idle(res)
    [done_task] = fake.tasks.values()
    await events.handle(task_event(done_task | {"status": "DONE", "updatedAt": "2026-11-24T13:00:00.000Z"}),
                        db=res.db, cache=res.cache)  # fmt: skip
    result = await auto_assign({"resources": res, "job_try": 1, "job_id": "auto_assign:test"})
    assert (result["owed"], result["created"], result["failed"]) == (2, 2, 0)
    assert "historical" in result["scope"]
    states = Counter(r["state"] for r in await db.fetch("SELECT state FROM follow_ups"))
    assert states == {"open": 2, "closed": 1}
    assert await db.fetchval("SELECT count(*) FROM follow_ups WHERE person_id = $1", historical) == 1


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
    await drain.until_idle(res)
    [task] = fake.tasks.values()
    assert task["title"] == "📞 Sales Follow-up — Web Hook"
    assert fake.calls["get_person"] == fake.calls["list"] == 0  # the webhook's record was enough
    assert [t["targetPersonId"] for t in fake.task_targets.values()] == [person_id]


async def test_a_returning_lead_gets_a_new_follow_up_once_the_last_is_done(
    twenty_settings: Settings, res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    lead = {"first_name": "Rita", "email": "rita@example.com"}
    async with app_client(twenty_settings) as api:
        assert (await api.post("/leads", json=lead)).status_code == 201
        await drain.until_idle(res)
        [first] = fake.tasks.values()
        await api.post("/leads", json=lead)  # back again while the follow-up is open: nothing new
        await drain.until_idle(res)
        assert len(fake.tasks) == 1
        done = first | {"status": "DONE", "updatedAt": "2026-11-24T13:00:00.000Z"}
        await events.handle(task_event(done), db=res.db, cache=res.cache)
        assert (await api.post("/leads", json=lead)).json()["status"] == "existing"
        await drain.until_idle(res)
    assert len(fake.tasks) == 2
    assert await db.fetchval("SELECT count(*) FROM follow_ups WHERE state = 'open'") == 1


async def test_a_workspace_change_does_not_reuse_the_old_members(
    twenty_settings: Settings, db: asyncpg.Pool, redis: Redis, fake: FakeTwenty
) -> None:
    async with open_resources(twenty_settings) as first:
        await ready(first)
        assert set(await first.cache.members()) == set(MEMBERS)
    fake.members = []
    fake.add_member("n1", "new@other.test")
    other = twenty_settings.model_copy(update={"twenty_rest_token": SecretStr("another-workspace")})
    async with open_resources(other) as second:
        person_id = fake.add_person("ws@example.com", first="Ws")
        await owe(second, fake, person_id)
        await drain.until_idle(second)
        assert set(await second.cache.members()) == {"n1"}
    assert [t["assigneeId"] for t in fake.tasks.values()] == ["n1"]
