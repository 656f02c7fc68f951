"""The follow-up rows: the only SQL on `follow_ups`, and every transition of a follow-up as one guarded statement.

States: `pending` (owed; once `assignee_id` is set, the row is that member's reservation) → `created` (the task is
in Twenty) → `open` (linked to the person) → `closed` (done or deleted in Twenty; a newer event may reopen it), or
`failed` (Twenty refused it). At most one row per person is active (pending, created or open): a partial unique
index, so concurrent triggers owe one follow-up, not two. Task ids and target ids are chosen when the row is made,
so every retry of a call upserts the same records in Twenty.

The drain loop claims rows with a lease (`claimed_until`), SKIP LOCKED, so any number of workers share the work
and a killed worker's rows are taken again when its lease runs out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

ACTIVE = ("pending", "created", "open")
PICK_LOCK = 7_314_052_013  # advisory lock: picks are made one batch at a time, fleet-wide

_OWE = """
INSERT INTO follow_ups (person_id, task_id, target_id, trigger, person)
SELECT o.person_id, gen_random_uuid()::text, gen_random_uuid()::text, $3, o.person
FROM unnest($1::text[], $2::jsonb[]) AS o(person_id, person)
ON CONFLICT (person_id) WHERE state IN ('pending', 'created', 'open') DO NOTHING
RETURNING person_id
"""


async def owe(conn: Conn, people: Mapping[str, Any | None], *, trigger: str) -> list[str]:
    """A pending follow-up for each person (id -> Person record or None) who has no active one. Returns the
    people a row was made for. Race-free: the unique index decides."""
    if not people:
        return []
    rows = await conn.fetch(_OWE, list(people), list(people.values()), trigger)
    return [row["person_id"] for row in rows]


async def claim(conn: Conn, *, limit: int, lease_s: float) -> list[asyncpg.Record]:
    """Lease up to `limit` rows with work to do (pending and not waiting, or created and not yet linked)."""
    return await conn.fetch(
        """UPDATE follow_ups SET claimed_until = now() + make_interval(secs => $2)
           WHERE id IN (
               SELECT id FROM follow_ups
               WHERE state IN ('pending', 'created') AND (wait_until IS NULL OR wait_until <= now())
                 AND (claimed_until IS NULL OR claimed_until < now())
               ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
           RETURNING *""",
        limit, float(lease_s),
    )  # fmt: skip


async def renew(conn: Conn, ids: Sequence[int], *, lease_s: float) -> None:
    await conn.execute(
        """UPDATE follow_ups SET claimed_until = now() + make_interval(secs => $2)
           WHERE id = ANY($1::bigint[]) AND state IN ('pending', 'created')""",
        list(ids), float(lease_s),
    )  # fmt: skip


async def work_waiting(conn: Conn) -> bool:
    """Whether a drain round would find anything: one cheap statement over partial indexes, for an idle loop."""
    return bool(await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM follow_ups WHERE state IN ('pending', 'created')
                   AND (wait_until IS NULL OR wait_until <= now()) AND (claimed_until IS NULL OR claimed_until < now()))
               OR EXISTS (SELECT 1 FROM leads WHERE NOT crm_synced AND NOT suppressed AND sync_gave_up_at IS NULL
                   AND (sync_claimed_until IS NULL OR sync_claimed_until < now()))
               OR EXISTS (SELECT 1 FROM leads WHERE crm_synced AND crm_person_id IS NOT NULL AND NOT suppressed
                   AND (follow_up_checked_at IS NULL OR follow_up_checked_at < last_seen_at))"""
    ))  # fmt: skip


async def lock_picks(conn: Conn) -> None:
    """Inside a transaction: one picker at a time, so each pick sees every earlier one."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", PICK_LOCK)


async def own_loads(conn: Conn, load_statuses: Sequence[str]) -> dict[str, int]:
    """member -> follow-ups reactor owes or made for them that count as load: reserved (pending or created with
    an assignee) and open ones whose task is in a load status."""
    rows = await conn.fetch(
        """SELECT assignee_id, count(*) AS n FROM follow_ups
           WHERE assignee_id IS NOT NULL AND state IN ('pending', 'created', 'open')
             AND (state <> 'open' OR coalesce(task_status, 'TODO') = ANY($1::text[]))
           GROUP BY assignee_id""",
        list(load_statuses),
    )
    return {row["assignee_id"]: int(row["n"]) for row in rows}


async def last_assigned(conn: Conn) -> dict[str, float]:
    """member -> when they were last given a follow-up (epoch seconds), for ties."""
    rows = await conn.fetch(
        """SELECT assignee_id, extract(epoch FROM max(assigned_at))::float8 AS at FROM follow_ups
           WHERE assignee_id IS NOT NULL AND assigned_at IS NOT NULL GROUP BY assignee_id"""
    )
    return {row["assignee_id"]: float(row["at"]) for row in rows}


async def assign(conn: Conn, assignments: Mapping[int, str]) -> None:
    """Row id -> member: the row is now that member's reservation."""
    await conn.execute(
        """UPDATE follow_ups SET assignee_id = a.member, assigned_at = clock_timestamp(), wait_until = NULL
           FROM unnest($1::bigint[], $2::text[]) AS a(id, member)
           WHERE follow_ups.id = a.id AND state = 'pending'""",
        list(assignments), list(assignments.values()),
    )  # fmt: skip


async def wait(conn: Conn, ids: Sequence[int], *, seconds: float) -> None:
    """Nobody can take these now: keep the rows, and look again after `seconds`."""
    await conn.execute(
        """UPDATE follow_ups SET wait_until = now() + make_interval(secs => $2), claimed_until = NULL
           WHERE id = ANY($1::bigint[]) AND state = 'pending'""",
        list(ids), float(seconds),
    )  # fmt: skip


async def remember_person(conn: Conn, people: Mapping[int, Any]) -> None:
    await conn.execute(
        "UPDATE follow_ups SET person = p.person FROM unnest($1::bigint[], $2::jsonb[]) AS p(id, person) "
        "WHERE follow_ups.id = p.id",
        list(people), list(people.values()),
    )  # fmt: skip


async def created(conn: Conn, tasks: Mapping[int, tuple[int, str | None, str | None]], *,
                  llm_used: Mapping[int, bool]) -> None:  # fmt: skip
    """Twenty has these tasks (row id -> (version ms, status, updatedAt as written)): pending -> created."""
    await conn.execute(
        """UPDATE follow_ups SET state = 'created', event_version = greatest(event_version, c.version),
                  task_status = coalesce(task_status, c.status), task_version = c.written, llm_used = c.llm,
                  last_error = NULL
           FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::bool[])
                AS c(id, version, status, written, llm)
           WHERE follow_ups.id = c.id AND state = 'pending'""",
        list(tasks), [t[0] for t in tasks.values()], [t[1] for t in tasks.values()], [t[2] for t in tasks.values()],
        [llm_used.get(i, False) for i in tasks],
    )  # fmt: skip


async def opened(conn: Conn, ids: Sequence[int], *, sla_hours: float) -> list[asyncpg.Record]:
    """The tasks are linked to their people: created -> open (with the SLA clock started, when one is set)."""
    return await conn.fetch(
        """UPDATE follow_ups SET state = 'open', opened_at = now(), claimed_until = NULL, last_error = NULL,
                  sla_due_at = CASE WHEN $2 > 0 THEN now() + make_interval(secs => $2 * 3600) END
           WHERE id = ANY($1::bigint[]) AND state = 'created'
           RETURNING *""",
        list(ids), float(sla_hours),
    )  # fmt: skip


async def fail(conn: Conn, errors: Mapping[int, str]) -> None:
    """Twenty refused these (row id -> why): the person's slot is free, the reservation gone."""
    await conn.execute(
        """UPDATE follow_ups SET state = 'failed', closed_at = now(), last_error = f.error, claimed_until = NULL
           FROM unnest($1::bigint[], $2::text[]) AS f(id, error)
           WHERE follow_ups.id = f.id AND state IN ('pending', 'created')""",
        list(errors), list(errors.values()),
    )  # fmt: skip


async def unfinished(conn: Conn, ids: Sequence[int]) -> list[asyncpg.Record]:
    """Of these rows, the ones still pending or created (what an interrupted batch has left to do)."""
    return await conn.fetch("SELECT * FROM follow_ups WHERE id = ANY($1::bigint[]) AND state IN ('pending', 'created')",
                            list(ids))  # fmt: skip


async def back_off(conn: Conn, ids: Sequence[int], *, error: str, delay_s: float) -> None:
    """Twenty could not be asked: count the attempt and keep the rows (and their reservations) for later."""
    await conn.execute(
        """UPDATE follow_ups SET attempts = attempts + 1, last_error = $2,
                  claimed_until = now() + make_interval(secs => $3)
           WHERE id = ANY($1::bigint[]) AND state IN ('pending', 'created')""",
        list(ids), error, float(delay_s),
    )  # fmt: skip


# -- task events ---------------------------------------------------------------------------------------------


async def lock_by_task(conn: Conn, task_id: str) -> asyncpg.Record | None:
    """The row of a task reactor made (None: not ours), locked until the transaction ends."""
    return await conn.fetchrow("SELECT * FROM follow_ups WHERE task_id = $1 FOR UPDATE", task_id)


async def apply_event(conn: Conn, row_id: int, *, changes: Mapping[str, Any]) -> bool:
    """Write a transition decided by `lifecycle.transition` (column -> value). False when a reopen met another
    active follow-up of the person (the unique index refused it): the row stays closed."""
    columns = list(changes)
    sets = ", ".join(f"{col} = ${i}" for i, col in enumerate(columns, start=2))
    extra = ", closed_at = now()" if changes.get("state") == "closed" else ""
    try:
        async with conn.transaction():
            await conn.execute(f"UPDATE follow_ups SET {sets}{extra} WHERE id = $1", row_id,
                               *(changes[c] for c in columns))  # fmt: skip
    except asyncpg.UniqueViolationError:
        return False
    return True


async def which_are_ours(conn: Conn, task_ids: Sequence[str]) -> set[str]:
    rows = await conn.fetch("SELECT task_id FROM follow_ups WHERE task_id = ANY($1::text[])", list(task_ids))
    return {row["task_id"] for row in rows}


# -- sweeps and reconcile ------------------------------------------------------------------------------------


async def claim_sla_due(conn: Conn, *, limit: int, max_rounds: int, lease_s: float) -> list[asyncpg.Record]:
    """Lease open follow-ups whose SLA is due (one sweep at a time works each)."""
    return await conn.fetch(
        """UPDATE follow_ups SET claimed_until = now() + make_interval(secs => $3)
           WHERE id IN (
               SELECT id FROM follow_ups
               WHERE state = 'open' AND sla_due_at <= now() AND reassignments < $2
                 AND (claimed_until IS NULL OR claimed_until < now())
               ORDER BY sla_due_at LIMIT $1 FOR UPDATE SKIP LOCKED)
           RETURNING *""",
        limit, max_rounds, float(lease_s),
    )  # fmt: skip


async def reassigned(conn: Conn, row_id: int, *, round_: int, assignee_id: str | None, version_ms: int,
                     written: str | None, next_due_hours: float | None) -> bool:  # fmt: skip
    """Record an SLA round (the task moved to `assignee_id`, or was found touched: None). Guarded by the round,
    so a round is recorded once however many sweeps race."""
    status = await conn.execute(
        """UPDATE follow_ups SET reassignments = reassignments + 1, claimed_until = NULL,
                  task_version = coalesce($6, task_version), assignee_id = coalesce($3, assignee_id),
                  assigned_at = CASE WHEN $3 IS NULL THEN assigned_at ELSE clock_timestamp() END,
                  event_version = greatest(event_version, $4),
                  sla_due_at = CASE WHEN $5::float8 IS NULL THEN NULL
                                    ELSE now() + make_interval(secs => $5 * 3600) END
           WHERE id = $1 AND state = 'open' AND reassignments = $2""",
        row_id, round_, assignee_id, version_ms, next_due_hours, written,
    )  # fmt: skip
    return status != "UPDATE 0"


async def by_task(conn: Conn, task_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM follow_ups WHERE task_id = $1", task_id)


async def latest_for_person(conn: Conn, person_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM follow_ups WHERE person_id = $1 ORDER BY id DESC LIMIT 1", person_id)


async def people_with_active(conn: Conn) -> set[str]:
    rows = await conn.fetch("SELECT person_id FROM follow_ups WHERE state IN ('pending', 'created', 'open')")
    return {row["person_id"] for row in rows}


async def people_with_any(conn: Conn, person_ids: Sequence[str]) -> set[str]:
    rows = await conn.fetch("SELECT DISTINCT person_id FROM follow_ups WHERE person_id = ANY($1::text[])",
                            list(person_ids))  # fmt: skip
    return {row["person_id"] for row in rows}


async def open_rows(conn: Conn) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT id, task_id, event_version FROM follow_ups WHERE state = 'open'")


async def close_missing(conn: Conn, ids: Sequence[int]) -> int:
    """Open rows whose task Twenty no longer lists as open (done or deleted while the event was lost)."""
    status = await conn.execute(
        "UPDATE follow_ups SET state = 'closed', closed_at = now() WHERE id = ANY($1::bigint[]) AND state = 'open'",
        list(ids),
    )
    return int(status.split()[-1])


async def synced_people_without_any(conn: Conn) -> list[str]:
    """People reactor synced from a lead who never had a follow-up (the trigger was lost)."""
    rows = await conn.fetch(
        """SELECT DISTINCT l.crm_person_id FROM leads l
           WHERE l.crm_synced AND l.crm_person_id IS NOT NULL AND NOT l.suppressed
             AND NOT EXISTS (SELECT 1 FROM follow_ups f WHERE f.person_id = l.crm_person_id)"""
    )
    return [row["crm_person_id"] for row in rows]


async def take_leads_owing_follow_up(conn: Conn, *, limit: int) -> list[str]:
    """Synced leads submitted since their follow-up was last checked: mark them checked and return their
    people (who then get a follow-up unless one is active). SKIP LOCKED, so workers share them."""
    rows = await conn.fetch(
        """UPDATE leads SET follow_up_checked_at = last_seen_at
           WHERE lead_id IN (
               SELECT lead_id FROM leads
               WHERE crm_synced AND crm_person_id IS NOT NULL AND NOT suppressed
                 AND (follow_up_checked_at IS NULL OR follow_up_checked_at < last_seen_at)
               ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED)
           RETURNING crm_person_id""",
        limit,
    )
    return list(dict.fromkeys(row["crm_person_id"] for row in rows))


async def mark_follow_up_checked(conn: Conn, lead_ids: Sequence[str]) -> None:
    await conn.execute("UPDATE leads SET follow_up_checked_at = last_seen_at WHERE lead_id = ANY($1::text[])",
                       list(lead_ids))  # fmt: skip


async def get_fact(conn: Conn, key: str) -> str | None:
    value: str | None = await conn.fetchval("SELECT value FROM reactor_facts WHERE key = $1", key)
    return value


async def set_fact(conn: Conn, key: str, value: str, *, keep_existing: bool = False) -> None:
    conflict = "DO NOTHING" if keep_existing else "DO UPDATE SET value = excluded.value, updated_at = now()"
    await conn.execute(f"INSERT INTO reactor_facts (key, value) VALUES ($1, $2) ON CONFLICT (key) {conflict}",
                       key, value)  # fmt: skip


async def counts_by_state(conn: Conn) -> dict[str, int]:
    rows = await conn.fetch("SELECT state, count(*) AS n FROM follow_ups GROUP BY state")
    return {row["state"]: int(row["n"]) for row in rows}
