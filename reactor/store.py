"""The only SQL in reactor: asyncpg queries on leads and their submissions. Functions take a connection.

Deduplication is race-free by construction: unique indexes on the normalised email and phone and on
`lead_id`, `INSERT … ON CONFLICT DO NOTHING`, and a bounded retry when a concurrent writer wins a race on one
of those keys. No code path reads and then decides to insert.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

# Plain columns an existing lead may gain (COALESCE) when a later submission supplies them.
MERGEABLE_COLUMNS = (
    "first_name",
    "last_name",
    "street",
    "city",
    "state",
    "postal_code",
    "country",
    "vehicle_make",
    "vehicle_model",
    "vehicle_year",
    "employer",
    "job_title",
    "employment_status",
    "years_employed",
    "salary_min",
    "salary_max",
    "current_credit",
    "consent",
    "source",
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
)
# Unique columns: gained only when no other lead already holds the value.
UNIQUE_COLUMNS = ("email", "phone")
_MAX_RACE_RETRIES = 5

_INSERT = f"""
INSERT INTO leads (lead_id, api_source, raw, {", ".join(UNIQUE_COLUMNS + MERGEABLE_COLUMNS)})
VALUES ($1, $2, $3, {", ".join(f"${i}" for i in range(4, 4 + len(UNIQUE_COLUMNS + MERGEABLE_COLUMNS)))})
ON CONFLICT DO NOTHING
RETURNING lead_id
"""

# Dedupe order: email first, then phone, then the source's lead_id.
_MATCH = """
SELECT lead_id FROM (
    SELECT lead_id, 1 AS rank FROM leads WHERE email = $1
    UNION ALL SELECT lead_id, 2 FROM leads WHERE phone = $2
    UNION ALL SELECT lead_id, 3 FROM leads WHERE lead_id = $3
) AS matches
ORDER BY rank
LIMIT 1
"""

_MERGE = f"""
UPDATE leads SET
    {", ".join(f"{col} = COALESCE({col}, ${i})" for i, col in enumerate(MERGEABLE_COLUMNS, start=5))},
    email = COALESCE(email, (SELECT $2::text WHERE NOT EXISTS (SELECT 1 FROM leads WHERE email = $2))),
    phone = COALESCE(phone, (SELECT $3::text WHERE NOT EXISTS (SELECT 1 FROM leads WHERE phone = $3))),
    raw = $4::jsonb || raw,
    last_seen_at = now(),
    submission_count = submission_count + 1
WHERE lead_id = $1
RETURNING lead_id
"""

_RECORD_SUBMISSION = """
INSERT INTO lead_submissions (lead_id, api_source, outcome, payload) VALUES ($1, $2, $3, $4)
"""


def new_lead_id() -> str:
    return f"ld_{uuid.uuid4().hex}"


async def upsert_lead(
    conn: Conn,
    *,
    lead_id: str | None,
    columns: Mapping[str, Any],
    raw: Mapping[str, Any],
    api_source: str,
    payload: Mapping[str, Any],
) -> tuple[str, bool]:
    """Store a submission; return (lead_id, created).

    Either inserts a new lead, or merges into the lead it matches (email, then phone, then lead_id): the match
    gains the fields it lacked and nothing it has is overwritten. Safe under any concurrency: when two
    submissions of one person race, the unique indexes let exactly one insert, and the others merge into it.
    Every submission is also kept verbatim in `lead_submissions`.
    """
    unique = [columns.get(col) for col in UNIQUE_COLUMNS]
    mergeable = [columns.get(col) for col in MERGEABLE_COLUMNS]
    for _ in range(_MAX_RACE_RETRIES):
        try:
            async with conn.transaction():
                inserted = await conn.fetchval(
                    _INSERT, lead_id or new_lead_id(), api_source, dict(raw), *unique, *mergeable
                )
                if inserted is not None:
                    await conn.execute(_RECORD_SUBMISSION, inserted, api_source, "created", dict(payload))
                    return inserted, True
                # The insert met a committed conflicting row (ON CONFLICT waits for an in-flight one), so a
                # fresh statement in READ COMMITTED sees it.
                match = await conn.fetchval(_MATCH, columns.get("email"), columns.get("phone"), lead_id)
                if match is None:
                    continue
                merged = await conn.fetchval(_MERGE, match, *unique, dict(raw), *mergeable)
                if merged is None:
                    continue
                await conn.execute(_RECORD_SUBMISSION, merged, api_source, "existing", dict(payload))
                return merged, False
        except asyncpg.UniqueViolationError:
            # A concurrent writer took an email or phone this merge wanted to fill in: go round again, and the
            # NOT EXISTS guards in _MERGE now see it.
            continue
    raise RuntimeError(f"lead upsert did not settle after {_MAX_RACE_RETRIES} attempts")


async def get_lead(conn: Conn, lead_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM leads WHERE lead_id = $1", lead_id)


async def list_leads(conn: Conn, *, limit: int, before_seq: int | None) -> list[asyncpg.Record]:
    """Newest first; `before_seq` is the cursor (the last seq of the previous page)."""
    return await conn.fetch(
        "SELECT * FROM leads WHERE ($1::bigint IS NULL OR seq < $1) ORDER BY seq DESC LIMIT $2",
        before_seq,
        limit,
    )


async def search_leads(
    conn: Conn,
    *,
    email: str | None,
    phone: str | None,
    name: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Leads matching every given criterion, newest first. `name` matches first, last or full name,
    case-insensitively (each backed by an expression index)."""
    return await conn.fetch(
        """
        SELECT * FROM leads
        WHERE ($1::text IS NULL OR email = $1)
          AND ($2::text IS NULL OR phone = $2)
          AND ($3::text IS NULL OR lower(first_name) = $3 OR lower(last_name) = $3
               OR lower(first_name || ' ' || last_name) = $3)
        ORDER BY seq DESC
        LIMIT $4
        """,
        email,
        phone,
        name.lower() if name else None,
        limit,
    )


async def ping(conn: Conn) -> None:
    await conn.fetchval("SELECT 1")
