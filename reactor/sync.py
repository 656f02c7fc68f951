"""Push leads to Twenty as People: what one round of the drain loop (reactor.drain) sends and records.

Every lead becomes exactly one Person:
* reactor chooses the Person's id when it first claims the lead and stores it before any call, so every push of
  a lead (a retry after a lost answer, a second worker) upserts that same id. A lead with only a phone is looked
  up by phone first, so a Person made outside reactor is updated rather than duplicated.
* A drain round leases the leads it pushes (store.claim_unsynced) and renews the lease while it runs; a killed
  worker's lease runs out and the lead is pushed again later, which the stable id makes harmless.
* A push is marked synced only at the lead version it sent; a lead changed meanwhile is pushed again.
* What is sent follows reactor.survivorship: everything on the first sync, only what changed on a re-sync,
  never a blank, and Twenty wins for a field someone edited there.
* Twenty's upsert also revives a Person in the trash. Unless `restore_deleted` is set, such a lead is marked
  suppressed instead (checked by id for every lead, and by email before its first push), so a person someone
  deleted stays deleted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from reactor import store, survivorship
from reactor.db import transaction_retrying_deadlocks
from reactor.settings import Settings
from reactor.twenty import Person, PersonInput, TwentyClient, TwentyError, TwentyRejected

log = logging.getLogger("reactor.sync")

TRASH_LOOKUP_CHUNK = 100  # emails per trash query: keeps the filter URL well under common 8 KiB limits


@dataclass(frozen=True)
class SyncOptions:
    field_map: Mapping[str, str]
    restore_deleted: bool
    batch_size: int = 200

    @classmethod
    def from_settings(cls, settings: Settings) -> SyncOptions:
        return cls(field_map=settings.person_field_map, restore_deleted=settings.restore_deleted_people,
                   batch_size=settings.twenty_batch_size)  # fmt: skip


@dataclass
class Pushed:
    """What one push to Twenty did, lead by lead."""

    synced: dict[str, str] = field(default_factory=dict)  # lead_id -> person id
    suppressed: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # lead_id -> Twenty's message
    people: list[Person] = field(default_factory=list)  # as Twenty returned them, for the follow-ups
    versions: dict[str, int] = field(default_factory=dict)  # lead_id -> the lead version this push sent
    values: dict[str, dict[str, Any]] = field(default_factory=dict)  # lead_id -> the values it stands for


def person_input(lead: Mapping[str, Any], field_map: Mapping[str, str], in_twenty: Person | None = None) -> PersonInput:
    """What this push sends for the lead (see reactor.survivorship): everything reactor has on the first
    sync, only what changed since the last push on a re-sync. `in_twenty`: the Person as Twenty holds it now."""
    values = survivorship.lead_values(lead, field_map)
    now = survivorship.twenty_values(in_twenty, field_map) if in_twenty is not None else None
    send = survivorship.changes(values, _pushed(lead), now)
    return survivorship.person_input(lead["crm_person_id"], send, values, now)


def _pushed(lead: Mapping[str, Any]) -> Mapping[str, Any] | None:
    pushed = lead.get("pushed")
    if isinstance(pushed, str):  # a connection without the jsonb codec
        pushed = json.loads(pushed)
    return pushed if lead.get("synced_version") is not None else None


async def push(leads: Sequence[Mapping[str, Any]], twenty: TwentyClient, options: SyncOptions) -> Pushed:
    """Push leased leads to Twenty. Raises TwentyUnavailable when Twenty is down or rate-limited (nothing is
    recorded then; the caller releases the leases). A rejected batch is retried lead by lead, so one bad
    record does not hold back the others. The trash is looked up by email for the leads not yet in Twenty.

    Every lead carries the Person id it is upserted by (chosen at the claim, stored before any call), so a
    retry after a lost answer, or a second worker, updates that same Person. Twenty's upsert matches on the id
    and on the primary email; when the email belongs to another Person already, Twenty updates that one and
    answers with its id, which is recorded instead."""
    pushed = Pushed()
    # Leads come from store.claim_unsynced, which gives each one its Person id; one without (a caller that did not
    # claim) is upserted by email as before, without the retry safety. An id the claim just chose cannot be in
    # Twenty yet: no look-up for it (a backlog of new leads costs one upsert per batch, as before).
    known_ids = [lead["crm_person_id"] for lead in leads if lead["crm_person_id"] and not lead.get("person_id_is_new")]
    by_id = {p.id: p for p in await twenty.find_people_by_ids(known_ids)} if known_ids else {}
    todo: list[tuple[Mapping[str, Any], Person | None]] = []
    for lead in leads:
        person = by_id.get(lead["crm_person_id"])
        if person is not None and person.deleted_at is not None and not options.restore_deleted:
            pushed.suppressed.append(lead["lead_id"])  # the trash is checked by id for every lead
        else:
            todo.append((lead, person))

    unseen = [lead for lead, person in todo if person is None and lead["email"]]
    if unseen and not options.restore_deleted:
        trashed = await _trashed_emails(twenty, [lead["email"] for lead in unseen])
        gone = {lead["lead_id"] for lead in unseen if lead["email"] in trashed}
        pushed.suppressed += sorted(gone)
        todo = [(lead, person) for lead, person in todo if lead["lead_id"] not in gone]

    bodies: list[tuple[Mapping[str, Any], PersonInput]] = []
    for lead, person in todo:
        if person is None and not lead["email"]:
            try:
                person = await _match_by_phone(lead, twenty, options, pushed)
            except TwentyRejected as exc:
                pushed.rejected[lead["lead_id"]] = str(exc)
                continue
            if lead["lead_id"] in pushed.suppressed:
                continue
            if person is not None:
                lead = {**lead, "crm_person_id": person.id}
        body = person_input(lead, options.field_map, person)
        if set(body.body()) <= {"id"}:  # nothing new for Twenty: the lead is in sync as it is
            _done(pushed, lead, lead["crm_person_id"], options, person)
        else:
            bodies.append((lead, body))

    for start in range(0, len(bodies), options.batch_size):
        await _push_batch(bodies[start : start + options.batch_size], twenty, options, pushed)
    return pushed


def _done(pushed: Pushed, lead: Mapping[str, Any], person_id: str, options: SyncOptions, person: Person | None) -> None:
    pushed.synced[lead["lead_id"]] = person_id
    pushed.versions[lead["lead_id"]] = lead["version"]
    pushed.values[lead["lead_id"]] = survivorship.lead_values(lead, options.field_map)
    if person is not None:
        pushed.people.append(person)


async def _match_by_phone(
    lead: Mapping[str, Any], twenty: TwentyClient, options: SyncOptions, pushed: Pushed
) -> Person | None:
    """A phone-only lead whose Person is not (yet) in Twenty under its id: a Person with its phone, made
    outside reactor, is the one to update. Twenty cannot upsert on a phone, hence the look-up."""
    existing = await twenty.find_person_by_phone(lead["phone"], include_deleted=True)
    if existing is not None and existing.deleted_at is not None and not options.restore_deleted:
        pushed.suppressed.append(lead["lead_id"])
        return None
    return existing


async def _push_batch(
    chunk: Sequence[tuple[Mapping[str, Any], PersonInput]], twenty: TwentyClient, options: SyncOptions, pushed: Pushed
) -> None:
    try:
        people = await twenty.upsert_people([body for _, body in chunk])
    except TwentyRejected as exc:
        if len(chunk) == 1:
            pushed.rejected[chunk[0][0]["lead_id"]] = str(exc)
            return
        for one in chunk:  # one bad record fails the whole batch: find it
            await _push_batch([one], twenty, options, pushed)
        return
    by_id = {person.id: person for person in people}
    by_email = {person.email: person for person in people if person.email}
    for lead, body in chunk:
        person = by_id.get(body.id or "") or (by_email.get(lead["email"]) if lead["email"] else None)
        if person is None:
            pushed.rejected[lead["lead_id"]] = "Twenty's answer did not include this Person"
        else:
            _done(pushed, lead, person.id, options, person)


async def _trashed_emails(twenty: TwentyClient, emails: list[str]) -> set[str]:
    trashed: set[str] = set()
    for start in range(0, len(emails), TRASH_LOOKUP_CHUNK):
        trashed |= await twenty.find_deleted_emails(emails[start : start + TRASH_LOOKUP_CHUNK])
    return trashed


async def record(db: asyncpg.Pool, pushed: Pushed) -> None:
    """Record a push. A lead is marked synced only at the version this push sent: one a submission changed
    meanwhile stays pending, so the next push sends the change (it was lost before)."""

    async def write(conn: store.Conn) -> None:
        if pushed.synced:
            await store.mark_synced(conn, pushed.synced, versions=pushed.versions, values=pushed.values)
        if pushed.suppressed:
            await store.mark_suppressed(conn, pushed.suppressed, "the Person is in Twenty's trash")
        if pushed.rejected:
            await store.give_up_sync(conn, pushed.rejected)

    await transaction_retrying_deadlocks(db, write, what="sync.record")
    for lead_id in pushed.suppressed:
        log.info("sync.suppressed lead_id=%s reason=person_deleted_in_twenty", lead_id)
    for lead_id, error in pushed.rejected.items():
        log.warning("sync.rejected lead_id=%s error=%s", lead_id, error)


async def release(db: asyncpg.Pool, lead_ids: Sequence[str], error: TwentyError) -> None:
    """Twenty was unavailable: count the attempt, keep the error, and free the leads for the next try."""
    errors = dict.fromkeys(lead_ids, str(error))
    await transaction_retrying_deadlocks(db, lambda conn: store.record_sync_errors(conn, errors), what="sync.release")
