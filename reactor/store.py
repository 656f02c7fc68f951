"""The only SQL in reactor: asyncpg queries on leads and their submissions. Functions take a connection.

Deduplication is race-free by construction: unique indexes on the normalised email and phone and on
`lead_id`, `INSERT … ON CONFLICT DO NOTHING`, and a bounded retry when a concurrent writer wins a race on one
of those keys. No code path reads and then decides to insert.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
# `raw` (the fields the schema does not know) is capped per lead; what does not fit stays in lead_submissions.
RAW_MAX_KEYS = 200
RAW_MAX_BYTES = 16 * 1024

_SUBMITTED = UNIQUE_COLUMNS + MERGEABLE_COLUMNS
_NOT_TEXT = {"vehicle_year": "integer", "years_employed": "numeric", "salary_min": "numeric",
             "salary_max": "numeric", "current_credit": "numeric", "consent": "boolean"}  # fmt: skip

# One submission, one round trip: the plpgsql function in schema.sql inserts or merges and records it.
_SUBMIT = f"""SELECT lead_id, created FROM reactor_submit_lead(
    $1, $2, $3, $4, $5, $6, $7, {", ".join(f"${i}" for i in range(8, 8 + len(_SUBMITTED)))})"""

# Many, in one statement and one transaction: the function once per submission, in order (a later one sees the
# earlier ones, as it would in a transaction of its own).
_SUBMIT_MANY = f"""SELECT r.lead_id, r.created
    FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[],
                {", ".join(f"${i}::{_NOT_TEXT.get(c, 'text')}[]" for i, c in enumerate(_SUBMITTED, 8))})
         WITH ORDINALITY AS s(lead_id, api_source, source_lead_id, raw, payload, {", ".join(_SUBMITTED)}, n)
    CROSS JOIN LATERAL reactor_submit_lead(s.lead_id, s.api_source, s.source_lead_id, s.raw, s.payload, $6, $7,
                                           {", ".join(f"s.{c}" for c in _SUBMITTED)}) AS r
    ORDER BY s.n"""


def new_lead_id() -> str:
    return f"ld_{os.urandom(16).hex()}"  # uuid4's 32 hex digits, without building a UUID


@dataclass(frozen=True)
class LeadSubmission:
    """One accepted POST /leads, as the store writes it."""

    api_source: str
    source_lead_id: str | None
    columns: Mapping[str, Any]  # the lead's own columns (LeadIn.columns)
    raw: Mapping[str, Any]  # the fields the schema does not know
    payload: Mapping[str, Any]  # the submission verbatim


async def upsert_leads(conn: Conn, submissions: Sequence[LeadSubmission]) -> list[tuple[str, bool]]:
    """Store submissions, in order; return (reactor's lead_id, created) for each.

    Each either inserts a new lead under a new reactor id, or merges into the lead it matches (email, then phone,
    then the source's own id within that source): see `reactor_submit_lead` in schema.sql for the merge rules.
    Safe under any concurrency: the unique indexes let exactly one insert win, and the others merge into it.
    Every submission is also kept verbatim in `lead_submissions`. One statement, one round trip, however many.
    """
    if len(submissions) == 1:
        one = submissions[0]
        row = await conn.fetchrow(_SUBMIT, new_lead_id(), one.api_source, one.source_lead_id, one.raw, one.payload,
                                  RAW_MAX_KEYS, RAW_MAX_BYTES, *[one.columns.get(c) for c in _SUBMITTED])  # fmt: skip
        assert row is not None  # the function returns a row or raises
        return [(row["lead_id"], row["created"])]
    rows = await conn.fetch(
        _SUBMIT_MANY,
        [new_lead_id() for _ in submissions],
        [one.api_source for one in submissions],
        [one.source_lead_id for one in submissions],
        [one.raw for one in submissions],
        [one.payload for one in submissions],
        RAW_MAX_KEYS,
        RAW_MAX_BYTES,
        *[[one.columns.get(c) for one in submissions] for c in _SUBMITTED],
    )
    if len(rows) != len(submissions):
        raise RuntimeError(f"{len(rows)} results for {len(submissions)} submissions")
    return [(row["lead_id"], row["created"]) for row in rows]


_FOLLOW_UP_JOIN = """LEFT JOIN LATERAL (
               SELECT * FROM follow_ups WHERE person_id = l.crm_person_id ORDER BY id DESC LIMIT 1) f ON true"""
# A lead with its person's latest follow-up: the `fu_*` columns Lead.from_row reads.
_LEAD_WITH_FOLLOW_UP = """l.*, f.task_id AS fu_task_id, f.assignee_id AS fu_assignee_id, f.state AS fu_state,
                  f.llm_used AS fu_llm_used, f.opened_at AS fu_opened_at"""


def _page_with_follow_up(page: str) -> str:
    """A page of leads shaped as get_lead shapes one. The page is chosen first, on the leads' own indexes, so the
    follow-up lookup (follow_ups_person) runs once per lead shown rather than once per lead matched."""
    return f"SELECT {_LEAD_WITH_FOLLOW_UP} FROM ({page}) l {_FOLLOW_UP_JOIN} ORDER BY l.seq DESC"


async def get_lead(conn: Conn, lead_id: str, *, api_source: str | None = None) -> asyncpg.Record | None:
    """The lead, with its person's latest follow-up (`fu_*` columns, NULL when there is none).

    `lead_id` is reactor's id or, when `api_source` is given, that source's own id for the lead; the source's
    id wins when both name a lead (a source looks its leads up by the ids it gave them)."""
    return await conn.fetchrow(
        f"""SELECT {_LEAD_WITH_FOLLOW_UP}
           FROM leads l
           {_FOLLOW_UP_JOIN}
           WHERE l.lead_id = (
               SELECT m.lead_id FROM (
                   SELECT lead_id, 1 AS rank FROM leads WHERE api_source = $2 AND source_lead_id = $1
                   UNION ALL SELECT lead_id, 2 FROM leads WHERE lead_id = $1
               ) AS m ORDER BY m.rank LIMIT 1)""",
        lead_id,
        api_source,
    )


async def latest_leads(conn: Conn, *, limit: int) -> list[asyncpg.Record]:
    """The newest leads with their person's latest follow-up (for the dashboard)."""
    return await conn.fetch(
        f"""SELECT l.lead_id, l.first_name, l.last_name, l.email, l.created_at, l.crm_synced, l.suppressed,
                  l.sync_attempts, l.last_sync_error, f.state AS fu_state, f.assignee_id AS fu_assignee_id
           FROM leads l
           {_FOLLOW_UP_JOIN}
           ORDER BY l.seq DESC LIMIT $1""",
        limit,
    )


async def count_failed_jobs(conn: Conn) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM failed_jobs WHERE replayed_at IS NULL"))


_LIST = _page_with_follow_up("SELECT * FROM leads WHERE ($1::bigint IS NULL OR seq < $1) ORDER BY seq DESC LIMIT $2")


async def list_leads(conn: Conn, *, limit: int, before_seq: int | None) -> list[asyncpg.Record]:
    """Newest first, each with its person's latest follow-up as in get_lead; `before_seq` is the cursor (the last
    seq of the previous page)."""
    return await conn.fetch(_LIST, before_seq, limit)


_SEARCH = _page_with_follow_up("""SELECT * FROM leads
              WHERE ($1::text IS NULL OR email = $1)
                AND ($2::text IS NULL OR phone = $2)
                AND ($3::text IS NULL OR lower(first_name) = $3 OR lower(last_name) = $3
                     OR lower(first_name || ' ' || last_name) = $3)
              ORDER BY seq DESC
              LIMIT $4""")


async def search_leads(
    conn: Conn,
    *,
    email: str | None,
    phone: str | None,
    name: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Leads matching every given criterion, newest first, each with its person's latest follow-up as in get_lead.
    `name` matches first, last or full name, case-insensitively (each backed by an expression index)."""
    return await conn.fetch(
        _SEARCH,
        email,
        phone,
        name.lower() if name else None,
        limit,
    )


# --- sync to Twenty -------------------------------------------------------------------------------------------
# A lead is worked by one worker at a time: a claim is a lease (`sync_claimed_until`) taken by an UPDATE, so
# two drain loops never push the same lead at once, and a killed worker's lease simply runs out. The claim also
# chooses the lead's Person id the first time (stored before Twenty is called), so whoever pushes the lead next
# upserts the same Person.

_CLAIMABLE = """NOT crm_synced AND NOT suppressed AND sync_gave_up_at IS NULL
    AND (sync_claimed_until IS NULL OR sync_claimed_until < now())"""
_CHOOSE_PERSON_ID = "crm_person_id = coalesce(l.crm_person_id, gen_random_uuid()::text)"


async def claim_unsynced(conn: Conn, *, limit: int, lease_s: float) -> list[asyncpg.Record]:
    """Lease up to `limit` unsynced leads, oldest first, skipping any another worker holds. Each row carries
    `person_id_is_new`: its Person id was chosen by this claim (no Person can have it yet)."""
    return await conn.fetch(
        f"""WITH picked AS (SELECT lead_id, crm_person_id AS before FROM leads
                            WHERE {_CLAIMABLE} ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED)
            UPDATE leads l SET sync_claimed_until = now() + make_interval(secs => $2), {_CHOOSE_PERSON_ID}
            FROM picked WHERE l.lead_id = picked.lead_id
            RETURNING l.*, picked.before IS NULL AS person_id_is_new""",
        limit,
        lease_s,
    )


async def renew_sync_leases(conn: Conn, lead_ids: list[str], *, lease_s: float) -> None:
    """Extend the leases of leads still being pushed (a drain round's heartbeat)."""
    await conn.execute(
        """UPDATE leads SET sync_claimed_until = now() + make_interval(secs => $2)
           WHERE lead_id = ANY($1::text[]) AND sync_claimed_until IS NOT NULL""",
        lead_ids,
        lease_s,
    )


async def give_up_sync(conn: Conn, errors: Mapping[str, str]) -> None:
    """Twenty rejected these leads (lead_id -> error): count the attempt and stop sweeping them."""
    await conn.execute(
        """UPDATE leads SET sync_attempts = sync_attempts + 1, last_sync_error = e.error,
                            sync_claimed_until = NULL, sync_gave_up_at = now()
           FROM unnest($1::text[], $2::text[]) AS e(lead_id, error)
           WHERE leads.lead_id = e.lead_id""",
        list(errors),
        list(errors.values()),
    )


async def retry_sync(conn: Conn, lead_id: str) -> None:
    """Make a lead Twenty once rejected eligible for syncing again."""
    await conn.execute("UPDATE leads SET sync_gave_up_at = NULL WHERE lead_id = $1", lead_id)


async def count_unsynced(conn: Conn) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM leads WHERE NOT crm_synced AND NOT suppressed"))


async def mark_synced(
    conn: Conn,
    person_ids: Mapping[str, str],
    *,
    versions: Mapping[str, int],
    values: Mapping[str, Mapping[str, Any]],
) -> None:
    """Record a push (lead_id -> person id, the lead version it sent, the values it stands for) and release the
    lease. The lead is marked synced only if it is still at that version; a newer one stays pending."""
    lead_ids = list(person_ids)
    await conn.execute(
        """UPDATE leads SET crm_person_id = p.person_id, crm_synced = (leads.version = p.version),
                            synced_version = p.version, pushed = p.pushed::jsonb, crm_synced_at = now(),
                            last_sync_error = NULL, sync_claimed_until = NULL
           FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) AS p(lead_id, person_id, version, pushed)
           WHERE leads.lead_id = p.lead_id""",
        lead_ids,
        [person_ids[lead_id] for lead_id in lead_ids],
        [versions[lead_id] for lead_id in lead_ids],
        [json.dumps(values[lead_id]) for lead_id in lead_ids],
    )


async def mark_suppressed(conn: Conn, lead_ids: list[str], reason: str) -> None:
    await conn.execute(
        """UPDATE leads SET suppressed = true, last_sync_error = $2, sync_claimed_until = NULL
           WHERE lead_id = ANY($1::text[])""",
        lead_ids,
        reason,
    )


async def record_sync_errors(conn: Conn, errors: Mapping[str, str]) -> None:
    """Count a failed attempt for each lead (lead_id -> error) and release its lease for the next try."""
    await conn.execute(
        """UPDATE leads SET sync_attempts = sync_attempts + 1, last_sync_error = e.error,
                            sync_claimed_until = NULL
           FROM unnest($1::text[], $2::text[]) AS e(lead_id, error)
           WHERE leads.lead_id = e.lead_id""",
        list(errors),
        list(errors.values()),
    )


# --- dead letters ----------------------------------------------------------------------------------------------


async def record_failed_job(
    conn: Conn, *, job_name: str, job_id: str | None, args: list[Any], error: str, attempts: int
) -> None:
    await conn.execute(
        "INSERT INTO failed_jobs (job_name, job_id, args, error, attempts) VALUES ($1, $2, $3, $4, $5)",
        job_name,
        job_id,
        args,
        error,
        attempts,
    )


async def list_failed_jobs(conn: Conn, *, limit: int, include_replayed: bool = False) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM failed_jobs WHERE ($2 OR replayed_at IS NULL) ORDER BY id DESC LIMIT $1",
        limit,
        include_replayed,
    )


async def take_failed_jobs(conn: Conn, *, job_name: str | None, failed_id: int | None) -> list[asyncpg.Record]:
    """Mark pending dead letters as replayed and return them (each is taken once, whoever else replays)."""
    return await conn.fetch(
        """UPDATE failed_jobs SET replayed_at = now()
           WHERE replayed_at IS NULL AND ($1::text IS NULL OR job_name = $1) AND ($2::bigint IS NULL OR id = $2)
           RETURNING *""",
        job_name,
        failed_id,
    )


# -- follow-ups ------------------------------------------------------------------------------------------


async def leads_for_people(conn: Conn, person_ids: list[str]) -> dict[str, asyncpg.Record]:
    """The newest lead synced as each of these People, for their follow-ups' context: one statement a batch."""
    rows = await conn.fetch(
        """SELECT DISTINCT ON (crm_person_id) * FROM leads WHERE crm_person_id = ANY($1::text[])
           ORDER BY crm_person_id, last_seen_at DESC""",
        person_ids,
    )
    return {row["crm_person_id"]: row for row in rows}


# -- routing -----------------------------------------------------------------------------------------------


async def member_availability(conn: Conn) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM member_availability")


async def save_member_availability(
    conn: Conn, member_id: str, *, away: bool, away_until: Any, working_hours: Any, max_open_tasks: int | None
) -> None:
    await conn.execute(
        """INSERT INTO member_availability (member_id, away, away_until, working_hours, max_open_tasks, updated_at)
           VALUES ($1, $2, $3, $4, $5, now())
           ON CONFLICT (member_id) DO UPDATE SET away = $2, away_until = $3, working_hours = $4,
                                                 max_open_tasks = $5, updated_at = now()""",
        member_id, away, away_until, working_hours, max_open_tasks,
    )  # fmt: skip


async def record_decisions(conn: Conn, decisions: Sequence[Mapping[str, Any]]) -> None:
    """Store a batch of decisions (person_id, task_id, member, rule, candidates) in one pipelined statement."""
    await conn.executemany(
        """INSERT INTO assignment_decisions (person_id, task_id, chosen_member, rule, candidates)
           VALUES ($1, $2, $3, $4, $5)""",
        [(d["person_id"], d["task_id"], d["member"], d["rule"], d["candidates"]) for d in decisions],
    )


async def decisions(conn: Conn, *, person_id: str | None, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT * FROM assignment_decisions WHERE ($1::text IS NULL OR person_id = $1)
           ORDER BY decided_at DESC, id DESC LIMIT $2""",
        person_id, limit,
    )  # fmt: skip


async def ping(conn: Conn) -> None:
    await conn.fetchval("SELECT 1")
