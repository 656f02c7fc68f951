"""Exactly-once claims of intake, under real concurrency on real PostgreSQL connections."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest

pytestmark = pytest.mark.anyio


async def test_100_concurrent_posts_of_one_person_make_one_lead(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    person = {"first_name": "Ada", "email": "ada@example.com", "phone": "+14155552671"}
    responses = await asyncio.gather(*(client.post("/leads", json=person) for _ in range(100)))

    assert sorted(r.status_code for r in responses) == [200] * 99 + [201]
    assert len({r.json()["lead_id"] for r in responses}) == 1
    rows = await db.fetch("SELECT lead_id, submission_count FROM leads")
    assert len(rows) == 1
    assert rows[0]["submission_count"] == 100
    assert await db.fetchval("SELECT count(*) FROM lead_submissions") == 100


async def test_concurrent_posts_with_the_same_source_id_make_one_lead(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    # Different emails each time (a source re-sending an edited form): the source's lead_id ties them.
    responses = await asyncio.gather(
        *(client.post("/leads", json={"lead_id": "src-9", "email": f"v{i}@example.com"}) for i in range(30))
    )
    assert len({r.json()["lead_id"] for r in responses}) == 1
    assert await db.fetchval("SELECT count(*) FROM leads") == 1
    assert await db.fetchval("SELECT source_lead_id FROM leads") == "src-9"


async def test_crossing_identities_race_without_errors_or_duplicates(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    """Submissions that pair the same emails and phones differently, all at once: no 500, no duplicate key."""
    emails = [f"c{i}@example.com" for i in range(5)]
    phones = [f"+1212555{i:04d}" for i in range(100, 105)]
    bodies = [{"email": emails[i % 5], "phone": phones[(i * 3) % 5]} for i in range(60)]
    bodies += [{"phone": phones[i % 5]} for i in range(20)] + [{"email": emails[i % 5]} for i in range(20)]
    responses = await asyncio.gather(*(client.post("/leads", json=body) for body in bodies))

    assert all(r.status_code in (200, 201) for r in responses)
    rows = await db.fetch("SELECT email, phone, submission_count FROM leads")
    emails_held = [row["email"] for row in rows if row["email"]]
    phones_held = [row["phone"] for row in rows if row["phone"]]
    assert sorted(emails_held) == emails  # each email on exactly one lead
    assert len(phones_held) == len(set(phones_held))
    assert sum(row["submission_count"] for row in rows) == len(bodies)
    # Every answer names a lead that exists.
    ids = {r.json()["lead_id"] for r in responses}
    assert ids <= {row["lead_id"] for row in await db.fetch("SELECT lead_id FROM leads")}
