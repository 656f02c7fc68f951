"""Leads reach Twenty as People through the drain loop's rounds (reactor.drain) and the backlog job, on the real
Redis and PostgreSQL, with Twenty mocked through respx (tests/fake_twenty.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator

import anyio
import asyncpg
import httpx
import pytest
import respx
from pydantic import SecretStr
from redis.asyncio import Redis

from reactor import deadletters, store, sync
from reactor import drain as drain_loop
from reactor.devstack import free_port
from reactor.resources import Resources, open_resources
from reactor.settings import Settings
from tests.conftest import app_client
from tests.fake_twenty import BASE_URL, FakeTwenty, unavailable

pytestmark = pytest.mark.anyio


@pytest.fixture
def twenty_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "twenty_rest_url": BASE_URL,
            "twenty_rest_token": SecretStr("tok"),
            "sync_max_tries": 3,
            "sync_retry_base_s": 0.01,
            "twenty_max_attempts": 2,
            "twenty_rate_limit": 100_000,
            "twenty_batch_size": 60,  # small batches, so a backlog of 130 shows the chunking
        }
    )


@pytest.fixture
def fake() -> Iterator[FakeTwenty]:
    twenty = FakeTwenty()
    with respx.mock(assert_all_called=False) as router:
        twenty.install(router)
        yield twenty


@pytest.fixture
async def res(twenty_settings: Settings, db: asyncpg.Pool, redis: Redis) -> AsyncIterator[Resources]:
    async with open_resources(twenty_settings) as resources:
        yield resources


@pytest.fixture
async def api(twenty_settings: Settings, db: asyncpg.Pool, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(twenty_settings) as http:
        yield http


async def drain(res: Resources) -> None:
    """What the worker's drain loop does: rounds until nothing is left (or Twenty cannot be asked)."""
    await drain_loop.until_idle(res)


async def sweep(res: Resources) -> sync.Pushed:
    """A drain loop's lead syncs, follow-ups aside: batches until no lead waits. What they pushed, together."""
    total = sync.Pushed()
    while True:
        pushed, outage = await drain_loop.sync_leads(res)
        assert outage is None
        if pushed is None:
            return total
        assert not total.synced.keys() & pushed.synced.keys()  # no lead is pushed twice
        total.synced |= pushed.synced
        total.suppressed += pushed.suppressed
        total.rejected |= pushed.rejected


async def run_jobs(res: Resources) -> None:
    """Run every queued arq job (the long ones) on a real worker, in burst mode."""
    from reactor.worker import build_worker

    await build_worker(res, burst=True, background=False).main()


async def post_lead(api: httpx.AsyncClient, **fields: object) -> str:
    response = await api.post("/leads", json=fields)
    assert response.status_code in (200, 201), response.text
    return str(response.json()["lead_id"])


async def test_a_posted_lead_ends_synced_with_the_person_id(
    api: httpx.AsyncClient, res: Resources, fake: FakeTwenty
) -> None:
    lead_id = await post_lead(api, first_name="Ada", email="ada@example.com", phone="+14155552671")
    await drain(res)

    lead = (await api.get(f"/leads/{lead_id}")).json()
    assert lead["crm_synced"] is True
    [person] = fake.people.values()
    assert lead["crm_person_id"] == person["id"]
    assert person["emails"]["primaryEmail"] == "ada@example.com"
    assert person["name"]["firstName"] == "Ada"


async def test_syncing_twice_changes_nothing(api: httpx.AsyncClient, res: Resources, fake: FakeTwenty) -> None:
    lead_id = await post_lead(api, email="twice@example.com")
    await drain(res)
    calls = sum(fake.calls.values())
    assert (await api.get(f"/leads/{lead_id}")).json()["crm_synced"] is True
    assert await drain_loop.sync_leads(res) == (None, None)  # nothing waits
    assert sum(fake.calls.values()) == calls
    assert len(fake.people) == 1


async def test_a_person_in_the_trash_stays_deleted(api: httpx.AsyncClient, res: Resources, fake: FakeTwenty) -> None:
    person_id = fake.add_person("gone@example.com", deleted=True)
    lead_id = await post_lead(api, email="gone@example.com")
    await drain(res)

    lead = (await api.get(f"/leads/{lead_id}")).json()
    assert lead["suppressed"] is True
    assert lead["crm_synced"] is False
    assert fake.people[person_id]["deletedAt"] is not None  # not resurrected
    assert fake.calls["batch"] == 0


async def test_restore_deleted_people_brings_them_back(
    twenty_settings: Settings, db: asyncpg.Pool, redis: Redis, fake: FakeTwenty
) -> None:
    person_id = fake.add_person("back@example.com", deleted=True)
    restoring = twenty_settings.model_copy(update={"restore_deleted_people": True})
    async with open_resources(restoring) as res:
        await db.execute("INSERT INTO leads (lead_id, email, api_source) VALUES ('r1', 'back@example.com', 't')")
        await drain(res)
    assert await db.fetchval("SELECT crm_person_id FROM leads WHERE lead_id = 'r1'") == person_id
    assert fake.people[person_id]["deletedAt"] is None


async def test_backlog_goes_through_the_batch_endpoint(
    api: httpx.AsyncClient, res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    rows = [(f"b{i}", f"b{i}@example.com") for i in range(130)]
    await db.executemany("INSERT INTO leads (lead_id, email, api_source) VALUES ($1, $2, 't')", rows)

    accepted = await api.post("/sync-crm")
    assert accepted.status_code == 202
    job_id = accepted.json()["job_id"]
    await run_jobs(res)

    status = (await api.get(f"/jobs/{job_id}")).json()
    assert status["status"] == "complete"
    result = status["result"]
    assert (result["total"], result["synced_count"], result["failed_count"]) == (130, 130, 0)
    assert sorted(result["synced"]) == sorted(lead_id for lead_id, _ in rows)
    assert [len(batch) for batch in fake.batches] == [60, 60, 10]
    assert await db.fetchval("SELECT count(*) FROM leads WHERE crm_synced") == 130


async def test_unknown_job_is_404(api: httpx.AsyncClient) -> None:
    response = await api.get("/jobs/nope")
    assert (response.status_code, response.json()["error"]) == (404, "job_not_found")


async def test_two_workers_sweeping_at_once_push_each_lead_once(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    rows = [(f"w{i}", f"w{i}@example.com") for i in range(240)]
    await db.executemany("INSERT INTO leads (lead_id, email, api_source) VALUES ($1, $2, 't')", rows)
    first, second = await asyncio.gather(sweep(res), sweep(res))
    pushed = [record["emails"]["primaryEmail"] for batch in fake.batches for record in batch]
    assert sorted(pushed) == sorted(email for _, email in rows)  # each exactly once
    assert len(first.synced) + len(second.synced) == 240


async def test_a_rejected_lead_is_isolated_dead_lettered_and_replayable(
    api: httpx.AsyncClient, res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    rows = [(f"x{i}", f"x{i}@example.com") for i in range(5)]
    await db.executemany("INSERT INTO leads (lead_id, email, api_source) VALUES ($1, $2, 't')", rows)
    fake.reject_emails = {"x3@example.com"}
    result = await sweep(res)
    assert list(result.rejected) == ["x3"]
    assert "Provided phone number is invalid" in result.rejected["x3"]
    assert sorted(result.synced) == ["x0", "x1", "x2", "x4"]

    lead = (await api.get("/leads/x3")).json()
    assert (lead["crm_synced"], lead["sync_attempts"]) == (False, 1)
    assert "Provided phone number is invalid" in lead["last_sync_error"]
    # It is not swept again until someone replays it.
    assert await drain_loop.sync_leads(res) == (None, None)

    listed = (await api.get("/jobs/failed")).json()["failed"]  # the round dead-lettered it
    assert [(f["job_name"], f["args"]) for f in listed] == [("sync_lead", ["x3"])]

    fake.reject_emails = set()
    replayed = await deadletters.replay(res.db, res.redis, job_name="sync_lead")
    assert [r.enqueued for r in replayed] == [True]
    await drain(res)
    assert (await api.get("/leads/x3")).json()["crm_synced"] is True
    assert (await api.get("/jobs/failed")).json()["failed"] == []


async def test_an_outage_backs_off_and_loses_nothing(api: httpx.AsyncClient, res: Resources, fake: FakeTwenty) -> None:
    fake.fail_next = [unavailable(503)] * 100
    lead_id = await post_lead(api, email="flaky@example.com")
    for _ in range(3):
        [result] = await drain_loop.until_idle(res)
        assert result.unavailable is not None  # the round stops at the first refusal: no retry storm
    lead = (await api.get(f"/leads/{lead_id}")).json()
    assert lead["crm_synced"] is False
    assert lead["sync_attempts"] == 3
    assert "503" in lead["last_sync_error"]
    fake.fail_next = []
    await drain(res)
    assert (await api.get(f"/leads/{lead_id}")).json()["crm_synced"] is True  # nothing is lost


async def test_intake_answers_while_redis_is_down_and_the_sweep_syncs_later(
    twenty_settings: Settings, db: asyncpg.Pool, res: Resources, fake: FakeTwenty
) -> None:
    no_redis = twenty_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    async with app_client(no_redis) as http:
        response = await http.post("/leads", json={"email": "noredis@example.com"})
    assert response.status_code == 201
    lead_id = response.json()["lead_id"]
    assert await db.fetchval("SELECT crm_synced FROM leads WHERE lead_id = $1", lead_id) is False

    assert list((await sweep(res)).synced) == [lead_id]


async def test_a_worker_killed_mid_round_leaves_the_lead_for_another_loop(res: Resources, db: asyncpg.Pool) -> None:
    await db.execute("INSERT INTO leads (lead_id, email, api_source) VALUES ('k1', 'killed@example.com', 't')")
    entered = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        entered.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    with respx.mock(assert_all_called=False) as router:
        router.route().mock(side_effect=hang)
        short = dataclasses.replace(res, settings=res.settings.model_copy(update={"sync_lease_s": 0.5}))
        task = asyncio.create_task(drain_loop.sync_leads(short))
        await entered.wait()
        task.cancel()  # the worker dies with the request in flight
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await db.fetchval("SELECT crm_synced FROM leads WHERE lead_id = 'k1'") is False

    await asyncio.sleep(0.6)  # the dead worker's lease runs out
    with respx.mock(assert_all_called=False) as router:
        FakeTwenty().install(router)
        result = await sweep(res)
    assert list(result.synced) == ["k1"]


async def test_a_backlog_reads_the_trash_once_a_batch_and_leaves_trashed_people_deleted(
    res: Resources, fake: FakeTwenty, db: asyncpg.Pool
) -> None:
    gone = fake.add_person("t5@example.com", deleted=True)
    rows = [(f"t{i}", f"t{i}@example.com") for i in range(130)]
    await db.executemany("INSERT INTO leads (lead_id, email, api_source) VALUES ($1, $2, 't')", rows)

    result = await sweep(res)

    assert result.suppressed == ["t5"]
    assert len(result.synced) == 129
    assert fake.people[gone]["deletedAt"] is not None
    # 130 new leads in batches of 60: a trash read and an upsert per batch (no by-id read: their Person ids were
    # chosen by these claims)
    assert (fake.calls["list"], fake.calls["batch"]) == (3, 3)
    assert await db.fetchval("SELECT suppressed FROM leads WHERE lead_id = 't5'") is True


async def test_intake_queues_no_job_the_row_is_the_work(api: httpx.AsyncClient, res: Resources) -> None:
    await post_lead(api, email="row@example.com")
    assert await res.redis.zcard("arq:queue") == 0
    async with res.db.acquire() as conn:
        assert await store.count_unsynced(conn) == 1


async def test_a_round_skips_a_lead_another_loop_holds(res: Resources, fake: FakeTwenty, db: asyncpg.Pool) -> None:
    await db.executemany(
        "INSERT INTO leads (lead_id, email, api_source) VALUES ($1, $2, 't')",
        [("busy", "busy@example.com"), ("free", "free@example.com")],
    )
    async with db.acquire() as conn:  # another loop's round leases the oldest lead
        [held] = await store.claim_unsynced(conn, limit=1, lease_s=60)
    assert held["lead_id"] == "busy"

    result = await sweep(res)

    assert list(result.synced) == ["free"]
    pushed = [record["emails"]["primaryEmail"] for batch in fake.batches for record in batch]
    assert pushed == ["free@example.com"]


async def test_a_lead_that_gains_fields_updates_its_person_without_a_duplicate(
    api: httpx.AsyncClient, res: Resources, fake: FakeTwenty
) -> None:
    lead_id = await post_lead(api, first_name="Phil", phone="+14155552671")  # phone only: no upsert key
    await drain(res)
    [person_id] = fake.people
    await asyncio.sleep(0.01)

    again = await api.post("/leads", json={"phone": "(415) 555-2671", "email": "phil@example.com",
                                           "employment": {"job_title": "CTO"}})  # fmt: skip
    assert again.json() == {"status": "existing", "lead_id": lead_id, "source_lead_id": None}
    assert (await api.get(f"/leads/{lead_id}")).json()["crm_synced"] is False  # to be pushed again
    await drain(res)

    assert list(fake.people) == [person_id]  # matched by id: the same Person, now with the email
    person = fake.people[person_id]
    assert (person["emails"]["primaryEmail"], person["jobTitle"]) == ("phil@example.com", "CTO")
    lead = (await api.get(f"/leads/{lead_id}")).json()
    assert (lead["crm_synced"], lead["crm_person_id"]) == (True, person_id)


async def test_a_repeat_that_adds_nothing_does_not_push_again(
    api: httpx.AsyncClient, res: Resources, fake: FakeTwenty
) -> None:
    lead_id = await post_lead(api, first_name="Ada", email="ada@example.com")
    await drain(res)
    await post_lead(api, first_name="Someone Else", email="ADA@example.com")  # nothing new: first_name is kept
    assert (await api.get(f"/leads/{lead_id}")).json()["crm_synced"] is True


async def test_a_round_slower_than_its_lease_keeps_its_leads(
    twenty_settings: Settings, db: asyncpg.Pool, redis: Redis
) -> None:
    """The lease is short (a killed worker's leads come back soon) and a live round renews it, however long its
    calls wait: a second loop never pushes the same lead meanwhile."""
    await db.execute("INSERT INTO leads (lead_id, email, api_source) VALUES ('slow', 'slow@example.com', 't')")
    entered, release = asyncio.Event(), asyncio.Event()
    twenty = FakeTwenty()

    async def slow(request: httpx.Request) -> httpx.Response:
        entered.set()
        await release.wait()
        return twenty._batch(request)

    short = twenty_settings.model_copy(update={"sync_lease_s": 0.6})
    async with open_resources(short) as res:
        with respx.mock(assert_all_called=False) as router:
            twenty.install(router)
            router.post(f"{BASE_URL}/batch/people").mock(side_effect=slow)  # replaces the fake's own route
            first = asyncio.create_task(drain_loop.sync_leads(res))
            with anyio.fail_after(10):
                while not entered.is_set():  # also fails if the round ended without a call
                    assert not first.done(), first.result()
                    await asyncio.sleep(0.01)
            for _ in range(4):  # well past the lease: still renewed
                await asyncio.sleep(0.3)
                async with db.acquire() as conn:
                    assert await store.claim_unsynced(conn, limit=10, lease_s=0.6) == []
            release.set()
            pushed, outage = await first
    assert outage is None
    assert pushed is not None
    assert pushed.synced.keys() == {"slow"}
    assert twenty.calls["batch"] == 1
