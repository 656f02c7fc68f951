"""Issue 14 cases 2-5 against real PostgreSQL and the Twenty simulator (in-process, through httpx's ASGI
transport), and the survivorship table of docs/survivorship.md row by row."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from reactor import drain, store, survivorship, sync
from reactor.resources import Resources, open_resources
from reactor.settings import Settings
from reactor.sim import create_sim
from reactor.twenty import Person, TwentyClient

pytestmark = pytest.mark.anyio

TOKEN = "sim-token"
OPTIONS = sync.SyncOptions(field_map={}, restore_deleted=False)


class LosingTransport(httpx.AsyncBaseTransport):
    """Forwards to the simulator; for the first `lose` creates of People, Twenty commits but the answer is lost."""

    def __init__(self, inner: httpx.AsyncBaseTransport, lose: int = 0) -> None:
        self.inner, self.lose = inner, lose

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST" and "/people" in request.url.path and self.lose > 0:
            self.lose -= 1
            await response.aread()
            raise httpx.ReadTimeout("answer lost", request=request)
        return response


@pytest.fixture
async def sim() -> AsyncIterator[tuple[Any, LosingTransport]]:
    app = create_sim(token=TOKEN, members=1, custom_person_fields={"leadBudget"})
    async with LifespanManager(app) as manager:
        yield app, LosingTransport(httpx.ASGITransport(app=manager.app))


@pytest.fixture
async def twenty(sim: tuple[Any, LosingTransport]) -> AsyncIterator[TwentyClient]:
    async with httpx.AsyncClient(transport=sim[1], base_url="http://sim/rest",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as http:  # fmt: skip
        yield TwentyClient(http, max_attempts=2, backoff_base_s=0.0, sleep=lambda _s: _nothing())


async def _nothing() -> None:
    return None


@pytest.fixture
async def res(settings: Settings, db: asyncpg.Pool, twenty: TwentyClient) -> AsyncIterator[Resources]:
    """The worker's resources, with the simulator's client as Twenty."""
    async with open_resources(settings) as resources:
        yield dataclasses.replace(resources, twenty=twenty)


def with_field_map(res: Resources, field_map: dict[str, str]) -> Resources:
    return dataclasses.replace(res, settings=res.settings.model_copy(update={"person_field_map": field_map}))


async def sync_round(res: Resources) -> sync.Pushed:
    """One drain round's lead sync, which finds leads waiting and Twenty answering."""
    pushed, outage = await drain.sync_leads(res)
    assert outage is None
    assert pushed is not None
    return pushed


def people(sim: tuple[Any, LosingTransport]) -> list[dict[str, Any]]:
    return list(sim[0].state.workspace.tables["person"].values())


async def lead_row(db: asyncpg.Pool, lead_id: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM leads WHERE lead_id = $1", lead_id)
    assert row is not None
    return row


async def post(client: httpx.AsyncClient, **fields: Any) -> str:
    response = await client.post("/leads", json=fields)
    assert response.status_code in (200, 201), response.text
    return str(response.json()["lead_id"])


async def test_a_repeat_during_a_sync_is_pushed_next(
    client: httpx.AsyncClient, db: asyncpg.Pool, twenty: TwentyClient, res: Resources, sim: tuple[Any, LosingTransport]
) -> None:
    lead_id = await post(client, first_name="Pat", phone="+14155550111")
    async with db.acquire() as conn:
        [claimed] = await store.claim_unsynced(conn, limit=10, lease_s=60)  # a worker starts pushing
    await post(client, phone="+14155550111", email="pat@example.com")  # the repeat lands meanwhile
    pushed = await sync.push([dict(claimed)], twenty, OPTIONS)
    await sync.record(db, pushed)
    row = await lead_row(db, lead_id)
    assert (row["crm_synced"], row["synced_version"], row["version"]) == (False, 1, 2)  # still owed
    [person] = people(sim)
    assert person["emails"]["primaryEmail"] == ""

    result = await sync_round(res)
    assert list(result.synced) == [lead_id]
    [person] = people(sim)
    assert person["emails"]["primaryEmail"] == "pat@example.com"  # was never sent before
    assert (await lead_row(db, lead_id))["crm_synced"] is True


async def test_a_resync_keeps_what_a_rep_edited_in_twenty(
    client: httpx.AsyncClient, db: asyncpg.Pool, res: Resources, sim: tuple[Any, LosingTransport]
) -> None:
    lead_id = await post(client, phone="+14155550122", employment={"job_title": "ops"})
    await sync_round(res)
    person_id = (await lead_row(db, lead_id))["crm_person_id"]
    sim[0].state.workspace.update("person", person_id, {"name": {"firstName": "John", "lastName": "Smith"},
                                                        "jobTitle": "Head of Ops"})  # fmt: skip
    await post(client, phone="+14155550122", email="john@example.com", employment={"job_title": "ops"})
    await sync_round(res)

    [person] = people(sim)
    assert person["name"] == {"firstName": "John", "lastName": "Smith"}  # was blanked
    assert person["jobTitle"] == "Head of Ops"  # was set back to "ops"
    assert person["emails"]["primaryEmail"] == "john@example.com"


async def test_a_lost_answer_does_not_make_a_second_person(
    client: httpx.AsyncClient, db: asyncpg.Pool, res: Resources, sim: tuple[Any, LosingTransport]
) -> None:
    lead_id = await post(client, first_name="Lone", phone="+14155550133")
    sim[1].lose = 3  # the create commits, its answer is lost, and so are the client's retry's and the next push's
    _, outage = await drain.sync_leads(res)
    assert outage is not None  # Twenty could not be asked: the lead's lease is released
    row = await lead_row(db, lead_id)
    assert row["crm_person_id"] is not None  # chosen and stored before the first create
    second = await sync_round(res)
    assert list(second.synced) == [lead_id]
    assert [p["id"] for p in people(sim)] == [row["crm_person_id"]]  # one Person, whatever was retried


async def test_a_phone_only_resync_does_not_revive_a_deleted_person(
    client: httpx.AsyncClient, db: asyncpg.Pool, res: Resources, sim: tuple[Any, LosingTransport]
) -> None:
    lead_id = await post(client, phone="+14155550144")
    await sync_round(res)
    person_id = (await lead_row(db, lead_id))["crm_person_id"]
    sim[0].state.workspace.delete("person", person_id, soft=True)  # a rep deleted the Person
    await post(client, phone="+14155550144", first_name="Again")  # still phone-only, now with a name
    result = await sync_round(res)

    assert result.suppressed == [lead_id]
    [person] = people(sim)
    assert person["deletedAt"] is not None  # not revived
    assert (await lead_row(db, lead_id))["suppressed"] is True


async def test_custom_fields_follow_the_same_rules(
    client: httpx.AsyncClient, db: asyncpg.Pool, res: Resources, sim: tuple[Any, LosingTransport]
) -> None:
    mapped = with_field_map(res, {"current_credit": "leadBudget"})
    lead_id = await post(client, email="budget@example.com", current_credit=100)
    await sync_round(mapped)
    [person] = people(sim)
    assert person["leadBudget"] == 100  # first sync: everything
    sim[0].state.workspace.update("person", person["id"], {"leadBudget": 999})  # edited in Twenty
    await post(client, email="budget@example.com", address={"city": "Oslo"})
    await sync_round(mapped)
    [person] = people(sim)
    assert (person["leadBudget"], person["city"]) == (999, "Oslo")  # Twenty wins; the new city is sent
    assert (await lead_row(db, lead_id))["crm_synced"] is True


# -- the table of docs/survivorship.md, row by row ----------------------------------------------------------

LEAD = {"first_name": "Ann", "last_name": None, "email": "ann@example.com", "phone": None, "job_title": "CFO",
        "city": None, "current_credit": 100}  # fmt: skip
MAP = {"current_credit": "leadBudget"}


def twenty_person(**fields: Any) -> Person:
    return Person.model_validate({"id": "p1", **fields})


def test_first_sync_sends_everything_reactor_has() -> None:
    values = survivorship.lead_values(LEAD, MAP)
    send = survivorship.changes(values, None, None)
    body = survivorship.person_input("p1", send, values, None).body()
    assert body == {"id": "p1", "name": {"firstName": "Ann", "lastName": ""}, "emails": {"primaryEmail":
                    "ann@example.com"}, "jobTitle": "CFO", "leadBudget": 100.0}  # fmt: skip


def test_a_resync_sends_only_what_was_gained_or_changed() -> None:
    pushed = survivorship.lead_values(LEAD, MAP)
    later = {**LEAD, "city": "Oslo", "current_credit": 200}
    values = survivorship.lead_values(later, MAP)
    send = survivorship.changes(values, pushed, None)
    assert send == {"city": "Oslo", "custom:leadBudget": 200.0}
    assert survivorship.person_input("p1", send, values, None).body() == {"id": "p1", "city": "Oslo",
                                                                          "leadBudget": 200.0}  # fmt: skip


def test_a_resync_never_sends_a_blank() -> None:
    pushed = survivorship.lead_values(LEAD, MAP)
    values = survivorship.lead_values({**LEAD, "job_title": None}, MAP)
    assert survivorship.changes(values, pushed, None) == {}


def test_twenty_wins_for_a_field_edited_there() -> None:
    pushed = survivorship.lead_values(LEAD, MAP)
    now = survivorship.twenty_values(twenty_person(jobTitle="Chief Financial Officer", leadBudget=5), MAP)
    values = survivorship.lead_values({**LEAD, "job_title": "CEO", "current_credit": 300}, MAP)
    assert survivorship.changes(values, pushed, now) == {}


def test_a_gained_name_part_keeps_the_other_part_twenty_has() -> None:
    pushed = survivorship.lead_values(LEAD, MAP)
    now = survivorship.twenty_values(twenty_person(name={"firstName": "Annie", "lastName": ""}), MAP)
    values = survivorship.lead_values({**LEAD, "last_name": "Lee"}, MAP)
    send = survivorship.changes(values, pushed, now)
    assert send == {"last_name": "Lee"}
    body = survivorship.person_input("p1", send, values, now).body()
    assert body["name"] == {"firstName": "Annie", "lastName": "Lee"}


async def test_two_workers_pushing_one_lead_make_one_person(
    client: httpx.AsyncClient, db: asyncpg.Pool, twenty: TwentyClient, sim: tuple[Any, LosingTransport]
) -> None:
    """A lease that ran out while its worker still pushes: the next worker pushes the same lead at once."""
    lead_id = await post(client, first_name="Twice", phone="+14155550155")
    async with db.acquire() as conn:
        [first] = await store.claim_unsynced(conn, limit=1, lease_s=0.001)
        assert first["lead_id"] == lead_id
        await conn.execute("UPDATE leads SET sync_claimed_until = now() - interval '1 second'")  # it ran out
        [second] = await store.claim_unsynced(conn, limit=1, lease_s=60)
        assert second["lead_id"] == lead_id
    assert first["crm_person_id"] == second["crm_person_id"]  # chosen once, before any call
    pushes = await asyncio.gather(*(sync.push([dict(row)], twenty, OPTIONS) for row in (first, second)))
    for pushed in pushes:
        await sync.record(db, pushed)
    assert [p["id"] for p in people(sim)] == [first["crm_person_id"]]
