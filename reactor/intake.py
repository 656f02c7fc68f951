"""Lead intake and lookup: validated leads in, stored once, read back. Explicit dependencies, typed results."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from reactor import store
from reactor.models import Lead, LeadIn


@dataclass(frozen=True)
class Submission:
    lead_id: str
    created: bool


async def submit(db: asyncpg.Pool, lead: LeadIn, *, api_source: str, payload: Mapping[str, Any]) -> Submission:
    """Store a lead, deduplicated (email, then phone, then the source's own id within that source). Race-free,
    one round trip; see store.upsert_lead."""
    async with db.acquire() as conn:
        lead_id, created = await store.upsert_lead(
            conn,
            source_lead_id=lead.lead_id,
            columns=lead.columns(),
            raw=lead.unknown_fields(),
            api_source=api_source,
            payload=payload,
        )
    return Submission(lead_id, created)


async def get(db: asyncpg.Pool, lead_id: str, *, api_source: str | None = None) -> Lead | None:
    """By reactor's id, or by `api_source`'s own id for the lead."""
    async with db.acquire() as conn:
        row = await store.get_lead(conn, lead_id, api_source=api_source)
    return None if row is None else Lead.from_row(row)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Raises ValueError for anything that is not a cursor this service issued."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("not a cursor this service issued") from None
    kind, _, number = text.partition(":")
    if kind != "seq" or not number.isdigit():
        raise ValueError("not a cursor this service issued")
    return int(number)


async def page(db: asyncpg.Pool, *, limit: int, before: int | None) -> tuple[list[Lead], str | None]:
    """A page of leads, newest first, and the cursor of the next page (None at the end). `before`: the decoded
    cursor of this page."""
    async with db.acquire() as conn:
        rows = await store.list_leads(conn, limit=limit + 1, before_seq=before)
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1]["seq"]) if more and rows else None
    return [Lead.from_row(row) for row in rows], next_cursor


async def search(db: asyncpg.Pool, *, email: str | None, phone: str | None, name: str | None, limit: int) -> list[Lead]:
    async with db.acquire() as conn:
        rows = await store.search_leads(conn, email=email, phone=phone, name=name, limit=limit)
    return [Lead.from_row(row) for row in rows]
