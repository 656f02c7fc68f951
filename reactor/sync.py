"""Sync leads to Twenty as People: one lead (the `sync_lead` job) or the backlog (sweep, POST /sync-crm).

Every lead becomes exactly one Person:
* Twenty's upsert matches on the primary email, so pushing a lead twice updates the same Person. A lead with
  only a phone is looked up by phone first, since Twenty cannot upsert on it.
* A worker leases the leads it pushes (store.claim_*), so the job and the sweep never push one lead at once; a
  killed worker's lease runs out and the lead is pushed again later, which the upsert makes harmless.
* Twenty's upsert also revives a Person in the trash. Unless `restore_deleted` is set, such a lead is marked
  suppressed instead, so a person someone deleted stays deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from reactor import store
from reactor.settings import Settings
from reactor.twenty import Person, PersonInput, TwentyClient, TwentyError, TwentyRejected

log = logging.getLogger("reactor.sync")

LEASE_S = 120.0  # longer than any in-call retry budget of the Twenty client
TRASH_LOOKUP_CHUNK = 100  # emails per trash query: keeps the filter URL well under common 8 KiB limits
TRASH_SNAPSHOT_MAX = 2000  # a backlog run reads a trash this small whole (10 calls at most), once


@dataclass(frozen=True)
class SyncOptions:
    field_map: Mapping[str, str]
    restore_deleted: bool
    batch_size: int = 200
    lease_s: float = LEASE_S

    @classmethod
    def from_settings(cls, settings: Settings) -> SyncOptions:
        return cls(field_map=settings.person_field_map, restore_deleted=settings.restore_deleted_people,
                   batch_size=settings.twenty_batch_size, lease_s=settings.sync_lease_s)  # fmt: skip


@dataclass
class Pushed:
    """What one push to Twenty did, lead by lead."""

    synced: dict[str, str] = field(default_factory=dict)  # lead_id -> person id
    suppressed: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # lead_id -> Twenty's message
    people: list[Person] = field(default_factory=list)  # as Twenty returned them, for the follow-ups


@dataclass
class BacklogResult:
    synced: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    suppressed: list[str] = field(default_factory=list)
    interrupted: str | None = None  # why the run stopped early (Twenty unavailable); the sweep carries on

    def as_dict(self) -> dict[str, Any]:
        total = len(self.synced) + len(self.failed) + len(self.suppressed)
        return {
            "total": total,
            "synced_count": len(self.synced),
            "failed_count": len(self.failed),
            "suppressed_count": len(self.suppressed),
            "synced": self.synced,
            "failed": self.failed,
            "suppressed": self.suppressed,
            "interrupted": self.interrupted,
        }


def person_input(lead: Mapping[str, Any], field_map: Mapping[str, str]) -> PersonInput:
    """The Person a lead becomes: name, primary email and phone, job title, city, and mapped custom fields."""
    custom = {
        person_field: _jsonable(lead[column]) for column, person_field in field_map.items() if lead[column] is not None
    }
    return PersonInput(
        id=lead["crm_person_id"],
        first_name=lead["first_name"] or "",
        last_name=lead["last_name"] or "",
        email=lead["email"],
        phone=lead["phone"],
        job_title=lead["job_title"],
        city=lead["city"],
        custom_fields=custom,
    )


def _jsonable(value: Any) -> Any:
    from decimal import Decimal

    return float(value) if isinstance(value, Decimal) else value


async def push(
    leads: Sequence[Mapping[str, Any]], twenty: TwentyClient, options: SyncOptions, trash: set[str] | None = None
) -> Pushed:
    """Push leased leads to Twenty. Raises TwentyUnavailable when Twenty is down or rate-limited (nothing is
    recorded then; the caller releases the leases). A rejected batch is retried lead by lead, so one bad
    record does not hold back the others. `trash`: the emails in Twenty's trash, when the caller already
    knows them; else they are looked up for these leads."""
    pushed = Pushed()
    with_email = [lead for lead in leads if lead["email"]]
    phone_only = [lead for lead in leads if not lead["email"]]

    if with_email and not options.restore_deleted:
        trashed = trash if trash is not None else await _trashed_emails(twenty, [lead["email"] for lead in with_email])
        pushed.suppressed += [lead["lead_id"] for lead in with_email if lead["email"] in trashed]
        with_email = [lead for lead in with_email if lead["email"] not in trashed]

    for start in range(0, len(with_email), options.batch_size):
        chunk = with_email[start : start + options.batch_size]
        try:
            people = await twenty.upsert_people([person_input(lead, options.field_map) for lead in chunk])
        except TwentyRejected as exc:
            if len(chunk) == 1:
                pushed.rejected[chunk[0]["lead_id"]] = str(exc)
                continue
            for lead in chunk:
                await _push_one(lead, twenty, options, pushed)
            continue
        pushed.people += people
        by_email = {person.email: person.id for person in people if person.email}
        for lead in chunk:
            person_id = by_email.get(lead["email"])
            if person_id is None:
                pushed.rejected[lead["lead_id"]] = "Twenty's answer did not include this email"
            else:
                pushed.synced[lead["lead_id"]] = person_id

    for lead in phone_only:
        await _push_one(lead, twenty, options, pushed)
    return pushed


async def _trashed_emails(twenty: TwentyClient, emails: list[str]) -> set[str]:
    trashed: set[str] = set()
    for start in range(0, len(emails), TRASH_LOOKUP_CHUNK):
        trashed |= await twenty.find_deleted_emails(emails[start : start + TRASH_LOOKUP_CHUNK])
    return trashed


async def _push_one(lead: Mapping[str, Any], twenty: TwentyClient, options: SyncOptions, pushed: Pushed) -> None:
    try:
        if not lead["email"] and not lead["crm_person_id"]:
            existing = await twenty.find_person_by_phone(lead["phone"], include_deleted=True)
            if existing is not None and existing.deleted_at is not None and not options.restore_deleted:
                pushed.suppressed.append(lead["lead_id"])
                return
            if existing is not None:
                pushed.synced[lead["lead_id"]] = existing.id
                pushed.people.append(existing)
                return
        person = await twenty.upsert_person(person_input(lead, options.field_map))
    except TwentyRejected as exc:
        pushed.rejected[lead["lead_id"]] = str(exc)
        return
    pushed.synced[lead["lead_id"]] = person.id
    pushed.people.append(person)


async def record(db: asyncpg.Pool, pushed: Pushed) -> None:
    async with db.acquire() as conn, conn.transaction():
        if pushed.synced:
            await store.mark_synced(conn, pushed.synced)
        if pushed.suppressed:
            await store.mark_suppressed(conn, pushed.suppressed, "the Person is in Twenty's trash")
        if pushed.rejected:
            await store.give_up_sync(conn, pushed.rejected)
    for lead_id in pushed.suppressed:
        log.info("sync.suppressed lead_id=%s reason=person_deleted_in_twenty", lead_id)
    for lead_id, error in pushed.rejected.items():
        log.warning("sync.rejected lead_id=%s error=%s", lead_id, error)


async def release(db: asyncpg.Pool, lead_ids: Sequence[str], error: TwentyError) -> None:
    """Twenty was unavailable: count the attempt, keep the error, and free the leads for the next try."""
    async with db.acquire() as conn:
        await store.record_sync_errors(conn, dict.fromkeys(lead_ids, str(error)))


async def sync_lead(db: asyncpg.Pool, twenty: TwentyClient, lead_id: str, options: SyncOptions) -> Pushed | None:
    """Sync one lead. None when there is nothing to do (synced, suppressed, unknown, or leased elsewhere).
    Idempotent. Raises TwentyUnavailable (the job retries) after recording the attempt on the lead."""
    async with db.acquire() as conn:
        lead = await store.claim_lead(conn, lead_id, lease_s=options.lease_s)
    if lead is None:
        return None
    try:
        pushed = await push([dict(lead)], twenty, options)
    except TwentyError as exc:
        await release(db, [lead_id], exc)
        raise
    await record(db, pushed)
    return pushed


async def sync_backlog(
    db: asyncpg.Pool,
    twenty: TwentyClient,
    options: SyncOptions,
    *,
    max_leads: int | None = None,
    on_synced: Callable[[list[Person]], Awaitable[None]] | None = None,
) -> BacklogResult:
    """Push every unsynced lead through Twenty's batch upsert, a batch at a time, oldest first.

    Safe beside other workers doing the same (each leases its own leads). Stops at the first TwentyUnavailable
    with what was done so far recorded and `interrupted` set; the next sweep carries on.
    """
    result = BacklogResult()
    chunk = max(options.batch_size, 1)
    done = 0
    trash: set[str] | None = None
    if not options.restore_deleted:
        try:
            # One look at the trash for the whole run instead of one per batch: half the calls on a backlog.
            trash = await twenty.trashed_emails(at_most=TRASH_SNAPSHOT_MAX)
        except TwentyError as exc:
            result.interrupted = str(exc)
            log.warning("sync.backlog_interrupted done=0 error=%s", exc)
            return result
    while max_leads is None or done < max_leads:
        async with db.acquire() as conn:
            leads = [dict(row) for row in await store.claim_unsynced(conn, limit=chunk, lease_s=options.lease_s)]
        if not leads:
            break
        try:
            pushed = await push(leads, twenty, options, trash)
        except TwentyError as exc:
            await release(db, [lead["lead_id"] for lead in leads], exc)
            result.interrupted = str(exc)
            log.warning("sync.backlog_interrupted done=%d error=%s", done, exc)
            break
        await record(db, pushed)
        if on_synced is not None and pushed.people:
            await on_synced(pushed.people)
        result.synced += list(pushed.synced)
        result.suppressed += pushed.suppressed
        result.failed += [{"lead_id": k, "error": v} for k, v in pushed.rejected.items()]
        done += len(leads)
    return result
