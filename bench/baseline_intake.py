"""The intake baseline `bench/intake.py --baseline` measures beside reactor: the way such services are often first
written. A new database connection per request, look-then-insert dedupe (by email, then phone), no validation
library. Not safe under concurrency (that is the point of reactor's design); used only to measure.

    uvicorn bench.baseline_intake:app   (DATABASE_URL: a database migrated with schema.sql)
"""

from __future__ import annotations

import os
import uuid

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def create_lead(request: Request) -> JSONResponse:
    body = await request.json()
    email = (body.get("email") or "").strip().lower() or None
    phone = body.get("phone") or None
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        existing = await conn.fetchval("SELECT lead_id FROM leads WHERE email = $1", email) if email else None
        if existing is None and phone:
            existing = await conn.fetchval("SELECT lead_id FROM leads WHERE phone = $1", phone)
        if existing is not None:
            await conn.execute("UPDATE leads SET submission_count = submission_count + 1, last_seen_at = now() "
                               "WHERE lead_id = $1", existing)  # fmt: skip
            return JSONResponse({"status": "existing", "lead_id": existing})
        lead_id = f"ld_{uuid.uuid4().hex}"
        await conn.execute("INSERT INTO leads (lead_id, email, phone, first_name, last_name, api_source) "
                           "VALUES ($1, $2, $3, $4, $5, 'baseline')", lead_id, email, phone,
                           body.get("first_name"), body.get("last_name"))  # fmt: skip
        return JSONResponse({"status": "created", "lead_id": lead_id}, status_code=201)
    finally:
        await conn.close()


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/leads", create_lead, methods=["POST"]), Route("/healthz", healthz)])
