"""schema.sql through `reactor.db.migrate`: idempotent, and safe when several processes migrate at once."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from reactor.db import migrate

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
