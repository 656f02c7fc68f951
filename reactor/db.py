"""The asyncpg pool and the schema migration. One pool per process, opened by `resources.open_resources`."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

log = logging.getLogger("reactor.db")
T = TypeVar("T")

# Any constant works; it only has to be the same in every process that migrates.
_MIGRATION_LOCK = 7_314_052_001


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset runs "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL" on every
    # release: a second round trip for every one-statement request. reactor leaves no session state behind (no
    # session advisory locks, LISTEN, SET or open cursors; open transactions are still rolled back by asyncpg).
    return None


async def create_pool(dsn: str, *, size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=size,
        init=_init_connection,
        reset=_keep_session,
        command_timeout=10,  # seconds: no query may hang a request forever
        timeout=10,  # seconds to connect
    )
    assert pool is not None
    return pool


async def transaction_retrying_deadlocks(
    db: asyncpg.Pool, work: Callable[[Any], Awaitable[T]], *, what: str, attempts: int = 3
) -> T:
    """`work(conn)` in a transaction, run again when PostgreSQL aborts it to break a deadlock.

    Intake writes leads in batches (reactor.intake.SubmissionWriter), so a statement that updates many leads at
    once, as recording a sync does, can deadlock with one; PostgreSQL then aborts one of the two. Intake rewrites
    its batch one by one; a worker's write is worth running again, not losing (a lost sync record means pushing
    the leads to Twenty again).
    """
    for attempt in range(1, attempts + 1):
        try:
            async with db.acquire() as conn, conn.transaction():
                return await work(conn)
        except asyncpg.DeadlockDetectedError:
            if attempt == attempts:
                raise
            log.info("db.deadlock what=%s attempt=%d of=%d; running it again", what, attempt, attempts)
    raise AssertionError("unreachable")


def schema_sql() -> str:
    # reactor/schema.sql is a link to the top-level schema.sql, so a built wheel carries it too.
    return Path(__file__).with_name("schema.sql").read_text()


async def migrate(conn: asyncpg.Connection) -> None:
    """Apply schema.sql. Idempotent, and safe when two processes migrate at once (advisory lock)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(schema_sql())
