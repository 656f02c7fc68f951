"""Who takes a follow-up: the rules, and the record of every decision.

A member is a candidate unless they are away (indefinitely or until a time) or outside their working hours in their
own time zone. Among candidates, the lowest open load divided by capacity weight wins (ASSIGNEE_WEIGHTS), skipping
anyone at their cap (per member, else MEMBER_MAX_OPEN_TASKS); ties go to the least recently assigned. Availability is
decided here; the picks themselves are made by assignees.assign (lifecycle.pick). When nobody can take the task,
FALLBACK_ASSIGNEE_EMAIL does, or the follow-up waits and is tried again. Every decision is stored with every
candidate as it was (`assignment_decisions`, GET /assignments).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from reactor import store
from reactor.settings import Settings

log = logging.getLogger("reactor.assign")

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WEEKDAYS: tuple[Day, ...] = DAYS[:5]


class WorkingHours(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timezone: str
    days: list[Day] = Field(default_factory=lambda: list(WEEKDAYS), min_length=1)
    start: dt.time
    end: dt.time

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone, e.g. Europe/Paris or America/New_York") from None
        return value

    @model_validator(mode="after")
    def _order(self) -> WorkingHours:
        if self.start >= self.end:
            raise ValueError("start must be before end (hours that cross midnight are not supported)")
        return self

    def open_at(self, moment: dt.datetime) -> bool:
        local = moment.astimezone(ZoneInfo(self.timezone))
        return DAYS[local.weekday()] in self.days and self.start <= local.time() < self.end


class Availability(BaseModel):
    """What PUT /members/{id}/availability takes."""

    model_config = ConfigDict(extra="forbid")

    away: bool = False  # away until further notice
    away_until: dt.datetime | None = None
    working_hours: WorkingHours | None = None
    max_open_tasks: int | None = Field(None, ge=0)  # None: MEMBER_MAX_OPEN_TASKS

    @field_validator("away_until")
    @classmethod
    def _aware(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("needs a time zone, e.g. 2026-12-01T09:00:00Z")
        return value

    def unavailable(self, moment: dt.datetime) -> str | None:
        """Why the member cannot take work at `moment` (None: they can)."""
        if self.away:
            return "away"
        if self.away_until is not None and self.away_until > moment:
            return "away_until"
        if self.working_hours is not None and not self.working_hours.open_at(moment):
            return "off_hours"
        return None


@dataclass(frozen=True)
class Candidate:
    member: str
    weight: float
    cap: int  # 0: none
    load: int | None = None
    skipped: str | None = None  # away, away_until, off_hours, capped


@dataclass(frozen=True)
class Decision:
    member_id: str | None  # None: nobody could take it (the follow-up waits)
    rule: str
    candidates: list[Candidate]


async def read_availability(db: asyncpg.Pool) -> dict[str, Availability]:
    async with db.acquire() as conn:
        rows = await store.member_availability(conn)
    return {row["member_id"]: Availability(away=row["away"], away_until=row["away_until"],
                                           working_hours=row["working_hours"],
                                           max_open_tasks=row["max_open_tasks"]) for row in rows}  # fmt: skip


async def save_availability(db: asyncpg.Pool, member_id: str, availability: Availability) -> None:
    hours = availability.working_hours.model_dump(mode="json") if availability.working_hours else None
    async with db.acquire() as conn:
        await store.save_member_availability(conn, member_id, away=availability.away,
                                             away_until=availability.away_until, working_hours=hours,
                                             max_open_tasks=availability.max_open_tasks)  # fmt: skip


def candidates(
    weights: Mapping[str, float], availability: Mapping[str, Availability], settings: Settings, moment: dt.datetime
) -> tuple[dict[str, tuple[float, int]], list[Candidate]]:
    """The members who may be picked now (member -> (weight, cap)), and why the others may not."""
    open_to: dict[str, tuple[float, int]] = {}
    skipped: list[Candidate] = []
    for member, weight in sorted(weights.items()):
        rules = availability.get(member)
        cap = rules.max_open_tasks if rules and rules.max_open_tasks is not None else settings.member_max_open_tasks
        reason = rules.unavailable(moment) if rules else None
        if reason:
            skipped.append(Candidate(member, weight, cap, skipped=reason))
        else:
            open_to[member] = (weight, cap)
    return open_to, skipped


async def recent_decisions(db: asyncpg.Pool, *, person_id: str | None, limit: int) -> list[dict[str, Any]]:
    async with db.acquire() as conn:
        rows = await store.decisions(conn, person_id=person_id, limit=limit)
    return [{"person_id": r["person_id"], "task_id": r["task_id"], "chosen_member": r["chosen_member"],
             "rule": r["rule"], "candidates": r["candidates"], "decided_at": r["decided_at"].isoformat()}
            for r in rows]  # fmt: skip
