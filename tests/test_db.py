"""schema.sql through `reactor.db.migrate`: idempotent, and safe when several processes migrate at once."""

from __future__ import annotations

import asyncio

import anyio
import asyncpg
import pytest

from reactor.db import migrate, transaction_retrying_deadlocks

pytestmark = pytest.mark.anyio

SCHEMA_SHAPE = """
SELECT table_name, column_name, data_type, is_nullable, column_default
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT tablename, indexname, indexdef, '', '' FROM pg_indexes WHERE schemaname = 'public'
ORDER BY 1, 2
"""


async def test_migrate_twice_changes_nothing(db: asyncpg.Pool) -> None:
    await db.execute("INSERT INTO leads (lead_id, email, api_source) VALUES ('keep', 'k@example.com', 't')")
    before = await db.fetch(SCHEMA_SHAPE)
    async with db.acquire() as conn:
        await migrate(conn)
        await migrate(conn)
    assert await db.fetch(SCHEMA_SHAPE) == before
    assert await db.fetchval("SELECT email FROM leads WHERE lead_id = 'keep'") == "k@example.com"


async def test_concurrent_migrations_do_not_collide(database_url: str, db: asyncpg.Pool) -> None:
    connections = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        await asyncio.gather(*(migrate(conn) for conn in connections))
    finally:
        for conn in connections:
            await conn.close()
    assert await db.fetchval("SELECT count(*) FROM leads") == 0


async def test_schema_refuses_a_lead_without_email_or_phone(db: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO leads (lead_id, api_source) VALUES ('x', 't')")


async def test_a_transaction_that_loses_a_deadlock_is_run_again(db: asyncpg.Pool) -> None:
    # Recording a sync updates many leads in one transaction; a batch of intake holding the same leads in another
    # order deadlocks with it, and PostgreSQL aborts the one that waited first: here, the recording.
    for lead_id in ("x", "y"):
        await db.execute("INSERT INTO leads (lead_id, email, api_source) VALUES ($1, $1 || '@example.com', 't')",
                         lead_id)  # fmt: skip
    attempts = 0
    first_waits = asyncio.Event()

    async def record(conn: asyncpg.Connection) -> str:
        nonlocal attempts
        attempts += 1
        await conn.execute("UPDATE leads SET first_name = 'recorded' WHERE lead_id = 'y'")
        if attempts == 1:
            first_waits.set()
        await conn.execute("UPDATE leads SET last_name = 'recorded' WHERE lead_id = 'x'")
        return "done"

    async with db.acquire() as intake, intake.transaction():
        await intake.execute("UPDATE leads SET first_name = 'intake' WHERE lead_id = 'x'")
        recording = asyncio.ensure_future(transaction_retrying_deadlocks(db, record, what="test"))
        with anyio.fail_after(20):
            await first_waits.wait()
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%''x''%'"
            while not await db.fetchval(waiting):  # noqa: ASYNC110 (a server's state, not an event)
                await asyncio.sleep(0.01)  # the recording now waits for x, which this transaction holds
            await intake.execute("UPDATE leads SET last_name = 'intake' WHERE lead_id = 'y'")  # the cycle
    with anyio.fail_after(20):
        assert await recording == "done"
    assert attempts == 2
    names = dict(await db.fetch("SELECT lead_id, first_name || '/' || last_name FROM leads"))
    assert names == {"x": "intake/recorded", "y": "recorded/intake"}  # both transactions' writes, none lost
