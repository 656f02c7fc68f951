"""Lead identity (issue 14, case 1): reactor's lead_id is the key; a source's id is unique only within that source.
Plus the merge rules that keep every stored lead readable (issue 16: salary ranges, a capped `raw`)."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest

from reactor import store
from reactor.db import migrate
from tests.conftest import API_KEYS

pytestmark = pytest.mark.anyio

ADS = {"X-API-Key": API_KEYS["adsplatform"]}


async def test_two_sources_may_use_the_same_id_for_different_people(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    alice = await client.post("/leads", json={"lead_id": "1001", "email": "alice@example.com", "first_name": "Alice"})
    bob = await client.post("/leads", json={"lead_id": "1001", "email": "bob@example.com", "first_name": "Bob"},
                            headers=ADS)  # fmt: skip
    assert (alice.status_code, bob.status_code) == (201, 201)  # Bob was "200 existing 1001" before
    assert alice.json()["lead_id"] != bob.json()["lead_id"]
    assert await db.fetchval("SELECT count(*) FROM leads") == 2
    # Each source reads its own lead by its own id, and anyone reads either by reactor's id.
    assert (await client.get("/leads/1001")).json()["first_name"] == "Alice"
    assert (await client.get("/leads/1001", headers=ADS)).json()["first_name"] == "Bob"
    assert (await client.get(f"/leads/{bob.json()['lead_id']}")).json()["first_name"] == "Bob"


async def test_a_source_id_still_dedupes_within_its_source(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    first = await client.post("/leads", json={"lead_id": "s-5", "phone": "+14155550101"}, headers=ADS)
    again = await client.post("/leads", json={"lead_id": "s-5", "email": "late@example.com"}, headers=ADS)
    assert (again.status_code, again.json()["lead_id"]) == (200, first.json()["lead_id"])
    assert await db.fetchval("SELECT email FROM leads") == "late@example.com"


async def test_concurrent_sources_with_one_id_make_one_lead_each(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    def post(i: int) -> object:
        headers = ADS if i % 2 else {}
        return client.post("/leads", json={"lead_id": "same", "email": f"r{i}@example.com"}, headers=headers)

    responses = await asyncio.gather(*(post(i) for i in range(40)))
    assert sorted(r.status_code for r in responses) == [200] * 38 + [201] * 2  # type: ignore[attr-defined]
    rows = await db.fetch("SELECT api_source, source_lead_id FROM leads ORDER BY api_source")
    assert [tuple(r) for r in rows] == [("adsplatform", "same"), ("webform", "same")]


async def test_migration_keeps_existing_ids_valid_and_is_idempotent(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    # A lead stored before this change: keyed by its source's id, without the new columns' values.
    await db.execute("INSERT INTO leads (lead_id, email, api_source, first_name) "
                     "VALUES ('legacy-7', 'old@example.com', 'webform', 'Old')")  # fmt: skip
    await db.execute("INSERT INTO leads (lead_id, email, api_source, job_title, crm_person_id, crm_synced) "
                     "VALUES ('legacy-8', 'synced@example.com', 'webform', 'CTO', 'p-8', true)")  # fmt: skip
    await db.execute("UPDATE leads SET source_lead_id = NULL")
    async with db.acquire() as conn:
        await migrate(conn)
        await migrate(conn)
    assert await db.fetchval("SELECT source_lead_id FROM leads WHERE lead_id = 'legacy-7'") == "legacy-7"
    # A lead synced before versions: recorded as pushed whole, so a re-sync sends only what changes from here.
    synced = await db.fetchrow("SELECT synced_version, pushed FROM leads WHERE lead_id = 'legacy-8'")
    assert (synced["synced_version"], synced["pushed"]) == (1, {"email": "synced@example.com", "job_title": "CTO"})
    assert await db.fetchval("SELECT synced_version FROM leads WHERE lead_id = 'legacy-7'") is None
    assert (await client.get("/leads/legacy-7")).json()["first_name"] == "Old"
    again = await client.post("/leads", json={"lead_id": "legacy-7", "phone": "+14155550123"})
    assert again.json()["lead_id"] == "legacy-7"
    new = (await client.post("/leads", json={"email": "gen@example.com"})).json()["lead_id"]
    async with db.acquire() as conn:
        await migrate(conn)  # a generated id is never taken for a source's id
    assert await db.fetchval("SELECT source_lead_id FROM leads WHERE lead_id = $1", new) is None


async def test_a_newer_salary_range_wins_whole(client: httpx.AsyncClient) -> None:
    first = await client.post("/leads", json={"lead_id": "sal-1", "email": "salary@x.io", "salary": {"max": 10}})
    assert (await client.post("/leads", json={"email": "salary@x.io", "salary": {"min": 20}})).status_code == 200
    lead = await client.get("/leads/sal-1")
    assert lead.status_code == 200  # was a 500: min 20 > max 10
    assert lead.json()["salary"] == {"min": 20, "max": None}
    assert lead.json()["lead_id"] == first.json()["lead_id"]
    page = await client.get("/leads", params={"limit": "1"})
    assert page.status_code == 200  # was a 422 "cursor"


async def test_a_lead_stored_upside_down_is_still_readable(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    # Written under the old merge rules: readable, never a 500 or a 422.
    await db.execute("INSERT INTO leads (lead_id, email, api_source, salary_min, salary_max) "
                     "VALUES ('upside', 'u@example.com', 'webform', 20, 10)")  # fmt: skip
    assert (await client.get("/leads/upside")).json()["salary"] == {"min": 20, "max": 10}
    listed = await client.get("/leads")
    assert (listed.status_code, [lead["lead_id"] for lead in listed.json()["leads"]]) == (200, ["upside"])
    assert (await client.get("/leads/search", params={"email": "u@example.com"})).status_code == 200


async def test_raw_is_capped_and_the_rest_stays_in_the_submissions(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    lead_id = (await client.post("/leads", json={"email": "raw@example.com", "keep": 1})).json()["lead_id"]
    for batch in range(20):  # 20 posts of new keys, 60 KB each
        extra = {f"k{batch}_{i}": "v" * 50 for i in range(1000)}
        assert (await client.post("/leads", json={"email": "raw@example.com", **extra})).status_code == 200
    small = {f"small{i}": i for i in range(3)}
    assert (await client.post("/leads", json={"email": "raw@example.com", **small})).status_code == 200
    raw = (await client.get(f"/leads/{lead_id}")).json()["raw"]
    assert raw == {"keep": 1, **small}  # what fits is kept
    stored = await db.fetchval("SELECT octet_length(raw::text) FROM leads")
    assert stored <= store.RAW_MAX_BYTES
    assert await db.fetchval("SELECT count(*) FROM lead_submissions WHERE lead_id = $1", lead_id) == 22
    kept = await db.fetchval("SELECT payload FROM lead_submissions WHERE lead_id = $1 ORDER BY id OFFSET 5", lead_id)
    assert len(kept) == 1001  # every key of that post, verbatim


async def test_too_many_raw_keys_in_one_post_are_not_stored_on_the_lead(client: httpx.AsyncClient) -> None:
    extra = {f"k{i}": i for i in range(store.RAW_MAX_KEYS + 1)}
    lead_id = (await client.post("/leads", json={"email": "many@example.com", **extra})).json()["lead_id"]
    assert (await client.get(f"/leads/{lead_id}")).json()["raw"] == {}


async def test_every_merge_that_changes_the_lead_bumps_its_version(client: httpx.AsyncClient) -> None:
    lead_id = (await client.post("/leads", json={"email": "v@example.com"})).json()["lead_id"]
    assert (await client.get(f"/leads/{lead_id}")).json()["version"] == 1
    await client.post("/leads", json={"email": "v@example.com"})  # nothing new
    assert (await client.get(f"/leads/{lead_id}")).json()["version"] == 1
    await client.post("/leads", json={"email": "v@example.com", "phone": "+14155550199"})
    assert (await client.get(f"/leads/{lead_id}")).json()["version"] == 2
